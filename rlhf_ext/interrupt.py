"""Ctrl-C or `kill` (SIGTERM) during training: finish the PPO iteration (or the reward model's optimizer step) under
way, save a checkpoint, stop.

Without it a signal landed anywhere — mid-sampling, mid-step — and everything after the last scheduled checkpoint was
lost (on a 7B run, `save_steps` iterations of tens of minutes each). A second Ctrl-C stops at once, as before; a
SIGTERM after a Ctrl-C does not (`accelerate launch` forwards one to its process a second after the terminal's
Ctrl-C reached both). Launchers give their processes only a grace period after they are signalled themselves —
`accelerate launch` 5 s for one process (for several it runs torchrun's agent), torchrun `--shutdown_timeout` (30 s)
— then kill them: the announcement says so, and how to signal the training processes alone so that the iteration can
finish. Under data parallelism every process gets the signal at its own moment; they agree on the iteration (or step)
to stop after through one small reduction each (`requested`), so all of them save and stop together.

The launcher also sends SIGTERM when one of its processes failed (an exception on one rank): that is no request to
stop after the iteration — no checkpoint can be saved without the failed process — and it is not taken as one: the
process says why it stops and stops at once (`launcher_is_stopping_the_job`), as it would without the handler. Before,
it announced a checkpoint it could not write and went on computing until its next collective failed.

The second half is for an exception instead of a signal (both trainers' `_save_after_failure`): the notes added to
the error (`note_saved`, `note_not_saved`), the random streams a failed step is rolled back to (`random_streams`,
`set_random_streams`) and freeing an out-of-memory error's frames before that save (`free_failed_step`).
"""

from __future__ import annotations

import gc
import random
import signal
import sys
import threading
import traceback

import numpy as np
import torch


_TERM = float(2 ** 20)  # a SIGTERM's weight in `requested`'s sum: above any count of processes signalled


class StopAfterIteration:
    """`with StopAfterIteration() as stop:` around the training loop; after each iteration `stop.requested(...)`
    says whether any process was signalled, and `stop.exception()` is what to raise once the checkpoint is saved:
    KeyboardInterrupt for Ctrl-C, SystemExit(128 + signal) for SIGTERM (the status a killed process reports)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True, unit: str = "iteration"):
        self.signum: int | None = None
        self.agreed: int | None = None  # the signal the processes stop on (`requested`)
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
        if signum == signal.SIGTERM and self.signum is None and launcher_is_stopping_the_job():
            # not a request to stop: the launcher ends the job because another of its processes ended (an error
            # there). No checkpoint can be saved without that process, and this one would go on computing until its
            # next collective fails, or the launcher kills it: stop now, as a process without this handler would.
            self.__exit__()
            print("\nSIGTERM from the launcher: another process of this job has ended (its error is above), so "
                  "this one stops now, without a checkpoint. Resume from the last checkpoint saved with "
                  "resume_from_checkpoint=True (recipes: --resume_from_checkpoint true).", file=sys.stderr,
                  flush=True)
            raise SystemExit(128 + signum)
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
        """Whether any process was signalled (`sum_over_processes`: float → its sum over every process). Each
        process adds 1 when signalled and _TERM more for a SIGTERM, so every process also learns whether any was
        sent a SIGTERM (`exception`)."""
        code = 0.0 if self.signum is None else 1.0 + (_TERM if self.signum == signal.SIGTERM else 0.0)
        total = sum_over_processes(code) if sum_over_processes is not None else code
        if total > 0:
            self.agreed = signal.SIGTERM if total >= _TERM else signal.SIGINT
        return total > 0

    def exception(self) -> BaseException:
        """What to raise: this process's own signal, or the one another process got — a process stopped because
        another was sent SIGTERM ends as SIGTERM (143), not as a Ctrl-C (which the launcher's summary reported as
        "Signal 2 (SIGINT) received" for a process nobody signalled)."""
        if (self.signum if self.signum is not None else self.agreed) == signal.SIGTERM:
            return SystemExit(128 + signal.SIGTERM)
        return KeyboardInterrupt()


def launcher_is_stopping_the_job() -> bool:
    """Whether a SIGTERM now is torchrun's (or `accelerate launch`'s multi-process) agent ending the job after one of
    its processes exited: fewer of its worker processes are alive than it started (LOCAL_WORLD_SIZE). A user's
    `kill -TERM` of a training process, or the launcher passing on its own SIGTERM, finds them all alive. False
    where it cannot be told (no elastic agent above, no psutil); a failed process on another node is not seen."""
    import os

    expected = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if expected < 2 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    try:
        import psutil

        me = psutil.Process()
        workers = [c for c in me.parent().children() if c.status() != psutil.STATUS_ZOMBIE
                   and c.environ().get("TORCHELASTIC_RUN_ID") == os.environ["TORCHELASTIC_RUN_ID"]]
    except Exception:  # noqa: BLE001 — no psutil, no parent, no permission: cannot tell, keep the graceful stop
        return False
    return 0 < len(workers) < expected


def launcher_note() -> str:
    """What a launcher above this process does once it is signalled too: kills it after a grace period, whatever
    the iteration — the way to let the iteration finish. Empty when no launcher is found."""
    try:
        import psutil

        parent = " ".join(psutil.Process().parent().cmdline())
    except Exception:  # noqa: BLE001 — no psutil, no parent, no permission: nothing to add
        return ""
    import os

    if "accelerate" in parent and "launch" in parent and "TORCHELASTIC_RUN_ID" in os.environ:
        # several processes: accelerate runs torchrun's agent in its own process, with torchrun's grace period
        grace = (f"accelerate launch (torchrun's agent, for several processes) kills its processes "
                 f"{os.environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT', '30')} s after it is itself signalled (Ctrl-C, "
                 f"or a kill of it)")
    elif "accelerate" in parent and "launch" in parent:
        grace = "accelerate launch kills its processes 5 s after it is itself signalled (Ctrl-C, or a kill of it)"
    elif "torchrun" in parent or "torch.distributed.run" in parent or "elastic" in parent:
        grace = "torchrun kills its processes --shutdown_timeout seconds (30) after it is itself signalled"
    else:
        return ""
    return (f" Note: {grace}; work under way for longer is lost, and a resumed run starts from the last "
            f"checkpoint. To let it finish and save, signal the training processes alone, not the launcher: "
            f"`pkill -TERM -f recipes/ppo.py` (or the script's name).")


# -- an exception instead of a signal: what finished is saved first (both trainers' `_save_after_failure`) ----------
RESUME_HOW = "Resume with resume_from_checkpoint=True (recipes: --resume_from_checkpoint true)."


def raised_inside(error: BaseException, function) -> bool:
    """Whether `function` (a plain function or method) is on `error`'s traceback: a failure inside a save is not
    answered with another save."""
    return any(f.f_code is function.__code__ for f, _ in traceback.walk_tb(error.__traceback__))


def note_saved(error: BaseException, folder, count: int, unit: str, after: str) -> None:
    error.add_note(f"rlhf_ext: {folder} holds the {count} {unit}(s) that finished ({after}). {RESUME_HOW}")


def random_streams() -> tuple:
    """Python's, NumPy's and torch's global random streams (every GPU's where CUDA is in use), to be put back by
    `set_random_streams` after a failed step drew from them: a resumed run then samples as the run that never
    failed."""
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def set_random_streams(streams: tuple) -> None:
    python, numpy, cpu, cuda = streams
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def free_failed_step(error: BaseException) -> None:
    """After an out-of-memory error the failed step's activations are still referenced by its frames on the
    traceback: freed before the save after the failure, else the save (and whatever the user does next in this
    process) meets the same full memory."""
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error):
        traceback.clear_frames(error.__traceback__)
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def note_not_saved(error: BaseException, why: str, newest: str | None) -> None:
    error.add_note(f"rlhf_ext: {why}, so nothing was saved; " + (f"the newest checkpoint is {newest}. {RESUME_HOW}"
                                                                 if newest else "no checkpoint was saved before it."))
