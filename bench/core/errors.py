"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class BenchError(Exception):
    """A user-facing error: bad input, unknown name, missing file. Printed as one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long computation that keeps its own state (learned editors' training):
    `note` says in one line what was saved and how to continue; the CLI prints it."""

    def __init__(self, note: str):
        super().__init__(note)
        self.note = note
