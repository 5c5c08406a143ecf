"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class StedmError(Exception):
    """Bad input or state a user can fix; the message names the file and the fix."""
