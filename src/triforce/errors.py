"""User-facing errors: the CLI and server print these as one line, never as a traceback."""


class TriforceError(Exception):
    """A problem with the user's input or environment, described in one clear sentence."""
