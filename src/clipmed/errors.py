"""The one exception type users see: a message that says what is wrong and how to fix it."""


class ClipmedError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
