"""Graceful stops. SIGTERM (a scheduler's preemption, `ray job stop`) or a first Ctrl-C asks the
loop to stop after the current step and write a checkpoint; a second Ctrl-C interrupts at once."""

import signal
import threading


class StopRequests:
    """A context manager that turns SIGTERM/SIGINT into a flag the loop reads between steps."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name  # no logging here: a handler may interrupt a log call

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
