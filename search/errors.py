"""The one exception type for mistakes a user can fix: bad options, bad files, bad data."""


class UserError(Exception):
    """A problem in the user's input. The message names the file, row or option at fault."""
