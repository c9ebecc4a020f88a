"""Leaving a multi-process run cleanly.

A gloo process can abort as it exits (SIGABRT, "terminate called without an active exception") after training
finished and wrote its results, and `accelerate launch` then reports the whole job as failed. A gloo worker thread
drops its last finished collective a moment after the Python side returned from it; when that moment falls inside
interpreter finalization, releasing the collective's tensors needs the GIL, Python ends the thread with
`pthread_exit`, and the forced unwind through a C++ destructor calls `std::terminate` (pytorch/pytorch#190489;
it failed this project's CI once; here 3 of 24 rounds of tests/gloo_exit_worker.py aborted without the close).
`destroy_process_group()` alone does not prevent it while a DDP model still holds the group: the worker threads
live on until the group is freed.

So the trainers register, for the end of the interpreter: destroy the default group (what torch asks every script to
do), then wait, with the GIL released, until every gloo worker thread is idle — everything it drops is then dropped
while Python can still take it.
"""

from __future__ import annotations

import atexit
import os
import time

import torch
import torch.distributed as dist

_registered = False
_GLOO_WORKER = "pt_gloo_runloop"  # the name torch gives ProcessGroupGloo's worker threads


def _gloo_worker_states() -> list[str] | None:
    """The scheduler state ('R', 'S', …) of each gloo worker thread of this process; None where /proc cannot say."""
    try:
        states = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            name, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:]
            if name == _GLOO_WORKER:
                states.append(rest.split()[0])
        return states
    except OSError:
        return None


def wait_for_gloo_workers(timeout: float = 2.0, poll: float = 0.005) -> bool:
    """Sleep (the GIL released) until every gloo worker thread has been asleep for two polls in a row — waiting for
    work, not finishing the last one. True when they were seen idle; without /proc, a fixed short sleep."""
    deadline, quiet = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        states = _gloo_worker_states()
        if states is None:
            time.sleep(0.1)
            return False
        quiet = quiet + 1 if all(s in ("S", "D") for s in states) else 0
        if quiet >= 2:
            return True
        time.sleep(poll)
    return False


def _close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    wait_for_gloo_workers()


def close_process_group_at_exit() -> None:
    """At interpreter exit: destroy the default process group (a no-op if the script already did, e.g. with
    `accelerator.end_training()`) and let gloo's worker threads finish (once per process; nothing for one process)."""
    global _registered
    if not _registered and dist.is_available() and dist.is_initialized():
        atexit.register(_close)
        _registered = True


def as_main_process_sees_it(accelerator, read):
    """`read()` evaluated on the main process and handed to every process. For what decides whether a process goes
    on to a collective (an earlier run found in output_dir): each process reading the folder itself could see it
    before or after the main one cleared it — or another node's disk — and skip a barrier the others wait in."""
    if accelerator.num_processes == 1:
        return read()
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([read() if accelerator.is_main_process else None])[0]


def sum_over_processes(accelerator, x: float) -> float:
    """`x` summed over every process: one small all-reduce (`x` itself in one process). Every process must call it."""
    if accelerator.num_processes == 1:
        return x
    return float(accelerator.reduce(torch.tensor([x], dtype=torch.float64, device=accelerator.device), "sum").item())
