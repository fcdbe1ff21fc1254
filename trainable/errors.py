"""The one exception type for mistakes a user can fix: bad options, bad files, bad data.

It lives at the bottom of the data flow (trainable/) so every layer can raise it; the CLI turns it
into one clear line and exit status 2.
"""


class UserError(Exception):
    """A problem in the user's input. The message names the file, row or option at fault."""
