"""Ctrl-C or `kill` (SIGTERM) during PPO training: finish the iteration under way, save a checkpoint, stop.

Without it a signal landed anywhere — mid-sampling, mid-step — and everything after the last scheduled checkpoint was
lost (on a 7B run, `save_steps` iterations of tens of minutes each). A second Ctrl-C stops at once, as before.
Under data parallelism every process gets the signal at its own moment; they agree on the iteration to stop after
through one small reduction per iteration (`requested`), so all of them save and stop together.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopAfterIteration:
    """`with StopAfterIteration() as stop:` around the training loop; after each iteration `stop.requested(...)`
    says whether any process was signalled, and `stop.exception()` is what to raise once the checkpoint is saved:
    KeyboardInterrupt for Ctrl-C, SystemExit(128 + signal) for SIGTERM (the status a killed process reports)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from the main thread
            for s in self.SIGNALS:
                if signal.getsignal(s) is signal.SIG_IGN:  # ignored on purpose (a `nohup` or `&` job): stay so
                    continue
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second one: stop now, as an unhandled Ctrl-C would
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: stopping after this iteration and saving a checkpoint "
                  f"(Ctrl-C again to stop at once, without one).", file=sys.stderr, flush=True)

    def requested(self, sum_over_processes=None) -> bool:
        """Whether any process was signalled (`sum_over_processes`: float → its sum over every process)."""
        flag = float(self.signum is not None)
        return (sum_over_processes(flag) if sum_over_processes is not None else flag) > 0

    def exception(self) -> BaseException:
        if self.signum == signal.SIGTERM:
            return SystemExit(128 + signal.SIGTERM)
        return KeyboardInterrupt()
