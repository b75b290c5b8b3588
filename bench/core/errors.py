"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class BenchError(Exception):
    """A user-facing error: bad input, unknown name, missing file. Printed as one line."""
