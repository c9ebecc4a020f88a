"""Ctrl-C or `kill` (SIGTERM) during training: finish the PPO iteration (or the reward model's optimizer step) under
way, save a checkpoint, stop.

Without it a signal landed anywhere — mid-sampling, mid-step — and everything after the last scheduled checkpoint was
lost (on a 7B run, `save_steps` iterations of tens of minutes each). A second Ctrl-C stops at once, as before; a
SIGTERM after a Ctrl-C does not (`accelerate launch` forwards one to its process a second after the terminal's
Ctrl-C reached both). Launchers give their processes only a grace period after they are signalled themselves —
`accelerate launch` 5 s, torchrun `--shutdown_timeout` (30 s) — then kill them: the announcement says so, and how
to signal the training processes alone so that the iteration can finish. Under data parallelism every process gets
the signal at its own moment; they agree on the iteration (or step) to stop after through one small reduction each
(`requested`), so all of them save and stop together.
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

    def __init__(self, announce: bool = True, unit: str = "iteration"):
        self.signum: int | None = None
        self.announce, self.unit = announce, unit
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
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now, as an unhandled one would
                self.__exit__()
                raise KeyboardInterrupt
            return  # a SIGTERM after the first signal (a launcher passing it on): already stopping
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: stopping after this {self.unit} and saving a checkpoint "
                  f"(Ctrl-C again to stop at once, without one).{launcher_note()}", file=sys.stderr, flush=True)

    def requested(self, sum_over_processes=None) -> bool:
        """Whether any process was signalled (`sum_over_processes`: float → its sum over every process)."""
        flag = float(self.signum is not None)
        return (sum_over_processes(flag) if sum_over_processes is not None else flag) > 0

    def exception(self) -> BaseException:
        if self.signum == signal.SIGTERM:
            return SystemExit(128 + signal.SIGTERM)
        return KeyboardInterrupt()


def launcher_note() -> str:
    """What a launcher above this process does once it is signalled too: kills it after a grace period, whatever
    the iteration — the way to let the iteration finish. Empty when no launcher is found."""
    try:
        import psutil

        parent = " ".join(psutil.Process().parent().cmdline())
    except Exception:  # noqa: BLE001 — no psutil, no parent, no permission: nothing to add
        return ""
    if "accelerate" in parent and "launch" in parent:
        grace = "accelerate launch kills its processes 5 s after it is itself signalled (Ctrl-C, or a kill of it)"
    elif "torchrun" in parent or "torch.distributed.run" in parent or "elastic" in parent:
        grace = "torchrun kills its processes --shutdown_timeout seconds (30) after it is itself signalled"
    else:
        return ""
    return (f" Note: {grace}; work under way for longer is lost, and a resumed run starts from the last "
            f"checkpoint. To let it finish and save, signal the training processes alone, not the launcher: "
            f"`pkill -TERM -f recipes/ppo.py` (or the script's name).")
