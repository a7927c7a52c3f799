"""The one exception type users see: its message is a single line naming the file, line or layer at fault."""


class DarkpruneError(Exception):
    """A user-facing error (bad input file, bad option, mismatched model). The CLI prints it as one line, exit 1."""
