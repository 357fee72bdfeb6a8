"""The one exception type a user ever sees: a one-line message, no traceback."""


class UnlearnflowError(Exception):
    """A user-facing error (bad params, bad input files, an impossible request).

    Stage scripts catch it, print its message on one line and exit with code 2; anything else
    is a bug and keeps its traceback.
    """


class ConfigError(UnlearnflowError, ValueError):
    """A value in params.yaml is unknown, missing or out of range."""


class DataError(UnlearnflowError, ValueError):
    """Input data that cannot be used as asked (a prompt longer than max_length, ragged rows)."""
