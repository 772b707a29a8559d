"""The one exception type for user mistakes: the CLI prints it on one line and exits 1."""


class MnistRayError(Exception):
    """A problem the user can fix (bad path, bad flag, missing data); the message says how."""
