"""Errors a user can fix. The CLI prints them as one line and exits with code 2; the Python API raises them."""


class UserError(Exception):
    """Bad input from the user: a config key, a data row, a path. The message says what, where, and what to do."""


class ConfigError(UserError):
    """A config key is unknown, mistyped, out of range, or clashes with another key."""


class DataError(UserError):
    """A dataset file, row or field cannot be used."""
