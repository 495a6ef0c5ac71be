"""Exceptions the user can fix.

Anything raised as a :class:`UserError` is a mistake in the input (a flag, a file, a
config field). The CLI prints its message as one sentence and exits with code 2; any
other exception is a bug and exits 1.
"""


class UserError(ValueError):
    """Bad input: the message names the field, flag or file and what is wrong.

    The message stays one line: a line break that came in with the input (a file name or
    data spec holding one) is shown escaped, as ``\\n``.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(str(message).translate(_ESCAPED_LINE_BREAKS), *args)


# Every character str.splitlines() breaks at, as its escape sequence.
_ESCAPED_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


class ConfigError(UserError):
    """An invalid model/training configuration or unknown preset."""


class DataError(UserError):
    """A data source that is missing, unreadable or does not fit the model."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or incompatible."""
