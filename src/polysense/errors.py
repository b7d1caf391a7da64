"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class PolysenseError(Exception):
    """An error caused by input (a file, a field, a flag); the message names it and the fix."""


class DataError(PolysenseError):
    """Unreadable or missing data: a path that does not exist, a source with no samples."""


class OutputError(PolysenseError):
    """An output that cannot be written: a read-only location, no permission, a full disk."""
