"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""


class LayerpruneError(Exception):
    """A user-facing error: bad input, missing file, unsupported model. Never a bug."""
