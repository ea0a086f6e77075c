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


def write_failure_reason(err: BaseException) -> str | None:
    """Why writing a file failed, when `err` is that (an OSError, or safetensors' own error for a full disk);
    None for any other exception."""
    if isinstance(err, OSError):
        return err.strerror or str(err) or type(err).__name__
    if "No space left on device" in str(err) or "StorageFull" in str(err):
        return "No space left on device"
    return None


EXIT_INTERNAL_ERROR = 1
REPORT_HINT = "run again with --debug for the traceback, and report it at the sftune issue tracker with that output"


def message_of_unexpected(err: BaseException) -> tuple[str, bool]:
    """One line for an exception that is not a UserError, and whether the user can fix it (not a bug in sftune).

    A full disk or a file that cannot be read or written is the machine's state, not a bug: it is said plainly.
    safetensors reports a full disk in its own error type, so the text is checked as well as the errno.
    """
    import errno

    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in text or "StorageFull" in text:
        where = f" while writing {err.filename}" if getattr(err, "filename", None) else ""
        return (f"no space left on the device{where}: free some space (or choose another output_dir), then run "
                "the same command again; a run continues from its last complete checkpoint"), True
    if isinstance(err, OSError):
        where = f" '{err.filename}'" if err.filename else ""
        reason = err.strerror or text or type(err).__name__
        return f"cannot use{where}: {reason}: check the path and its permissions", True
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"internal error ({type(err).__name__}{': ' + first if first else ''}); {REPORT_HINT}", False


def closest_names(word: str, names: list[str] | tuple[str, ...], most: int = 2) -> list[str]:
    """The names `word` was probably meant to be, best first; none when nothing is close enough.

    Close means a typo (edits, counting a swap of neighbours as one, at most a quarter of the longer name) or, for
    snake_case keys, every word of `word` found in the name (`num_epochs` -> `num_train_epochs`), when at most
    `most` names qualify. Sharing one word is not enough: `use_cpu` is not a misspelling of `use_peft`.
    """
    word = str(word)
    scored = []
    for name in dict.fromkeys(names):
        distance = edit_distance(word.lower(), name.lower())
        if distance <= max(1, max(len(word), len(name)) // 4):
            scored.append((distance, name))
    if scored:
        best = min(distance for distance, _ in scored)
        return [name for distance, name in scored if distance == best][:most]
    parts = [part for part in word.lower().split("_") if part]
    if len(parts) < 2:
        return []
    containing = [name for name in dict.fromkeys(names)
                  if len(name.split("_")) > len(parts) and all(part in name.lower().split("_") for part in parts)]
    return containing if len(containing) <= most else []


def did_you_mean(word: str, names: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)', ' (did you mean 'x' or 'y'?)', or '' when no name is close to `word`."""
    close = closest_names(word, names)
    return f" (did you mean {' or '.join(repr(name) for name in close)}?)" if close else ""


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of neighbours."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[len(b)]
