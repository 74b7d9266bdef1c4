"""The one exception type for problems with the user's input."""


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad flag value, a mismatched store).

    The CLI prints it as a single ``error: ...`` line on stderr and exits with status 1.
    """
