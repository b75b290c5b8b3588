"""SIGTERM stops a `bench` command as Ctrl-C does: the handler raises `Terminated`, a
KeyboardInterrupt, in the main thread, so the same `finally` blocks run (a run writes the
summary.json of its finished cases, marked `"complete": false`) and the command ends with the
interrupted message, exit code 143 (128 + SIGTERM) instead of Ctrl-C's 130. A second SIGTERM
while that happens is ignored, so it cannot cut the summary short; SIGKILL still ends the
process at once."""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is: handled as Ctrl-C is."""


class SigtermAsInterrupt:
    """Installs the SIGTERM handler for the life of one command (`restore` puts the previous
    handler back); `exit_code` is the code of an interrupted command: 143 after SIGTERM, else
    130. Does nothing outside the main thread (where Python cannot set handlers)."""

    def __init__(self):
        self.terminated = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread
            self._installed = False

    def _handle(self, signum, frame) -> None:
        self.terminated = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the way out is under way: no second interrupt
        raise Terminated()

    @property
    def exit_code(self) -> int:
        return 128 + (signal.SIGTERM if self.terminated else signal.SIGINT)

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
