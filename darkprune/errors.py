"""The exception types users see: each message is a single line naming the file, line, layer or setting at fault."""


class DarkpruneError(Exception):
    """A user-facing error (bad input file, bad option, mismatched model). The CLI prints it as one line, exit 1."""


class SettingError(DarkpruneError):
    """A bad value for one named setting.

    The library speaks of the setting by its config-file key (``criterion``, ``exclude``, ``threshold``...) and of what
    is wrong with the value; it never names a command-line flag. ``setting`` carries the key so that the command line
    can name its own flag (and a config reader its own file and line) when it reports the error.
    """

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting
