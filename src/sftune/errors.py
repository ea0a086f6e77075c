"""Errors a user can fix. The CLI prints them as one line and exits with code 2; the Python API raises them."""


class UserError(Exception):
    """Bad input from the user: a config key, a data row, a path. The message says what, where, and what to do."""


class ConfigError(UserError):
    """A config key is unknown, mistyped, out of range, or clashes with another key."""


class DataError(UserError):
    """A dataset file, row or field cannot be used."""


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, say); the message names the step and what to try."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a checkpoint was saved; resume_from_checkpoint continues it."""

    def __init__(self, step: int, checkpoint: str, signal_number: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {checkpoint}")
        self.step, self.checkpoint, self.signal_number = step, checkpoint, signal_number
