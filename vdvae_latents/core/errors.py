"""Exceptions the user can fix.

Anything raised as a :class:`UserError` is a mistake in the input (a flag, a file, a
config field). The CLI prints its message as one sentence and exits with code 2; any
other exception is a bug and exits 1.
"""


class UserError(ValueError):
    """Bad input: the message names the field, flag or file and what is wrong."""


class ConfigError(UserError):
    """An invalid model/training configuration or unknown preset."""


class DataError(UserError):
    """A data source that is missing, unreadable or does not fit the model."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or incompatible."""
