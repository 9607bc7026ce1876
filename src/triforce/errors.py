"""Errors a user can act on; each face (CLI, server, Python) shows one as a single line."""


class TriforceError(Exception):
    """A problem with the user's input or environment, described in one clear sentence."""


class SettingError(TriforceError):
    """A setting given a value it cannot take.

    `setting` is the Python name (e.g. "draft_gamma"); the CLI shows it as its flag
    (`--draft-gamma`) and the server as its request field (`triforce.draft_gamma`).
    `problem` completes the sentence: "must be an integer >= 1, got 0".
    """

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem
