"""The one exception type for problems with the user's input."""


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad flag value, a mismatched store).

    The CLI prints it as a single ``error: ...`` line on stderr and exits with status 1. Under torchrun, an
    error that every rank raises for one decision is printed by rank 0 only: the others' copies are `quiet`.
    """

    quiet: bool = False


def describe(e: BaseException) -> str:
    """`Type: message` cut to its first line: some errors span paragraphs, and a warning or `error:` is one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
