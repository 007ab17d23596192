"""The one exception type users see: a message that says what is wrong and how to fix it."""


class ClipmedError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""
