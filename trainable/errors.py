"""The one exception type for mistakes a user can fix: bad options, bad files, bad data.

It lives at the bottom of the data flow (trainable/) so every layer can raise it; the CLI turns it
into one clear line and exit status 2.
"""


class UserError(Exception):
    """A problem in the user's input. The message names the file, row or option at fault."""


def error_line(error: object, last: bool = False, limit: int = 300) -> str:
    """One line of an error for a one-line report: its message's first line (a message), or with
    `last` its last (a traceback's own line); the type's name when the message is empty."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__[:limit]
    return (lines[-1] if last else lines[0])[:limit]
