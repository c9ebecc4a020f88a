"""The work queue that `--workers N` processes share: each (variant, seed) key is claimed through an exclusive lock
file holding the worker's pid (stale locks are taken over), runs whose reward models are not trained yet are
skipped (or waited for with `--wait`), and a finished run is recognised by its record's `done` flag, so any number
of workers, started at any time, split the schedule between them and resume where others stopped."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .loop import LoopRun
from .runners import Run
from .tasks import rm_dir
from .variants import VARIANTS, proxies_for, settings


def claim(workdir: Path, key: str) -> bool:
    """One worker per run: an exclusive lock file holding the worker's pid (stale locks are taken over)."""
    lock = workdir / "locks" / f"{key.replace(':', '__s')}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(workdir, key)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def release(workdir: Path, key: str):
    (workdir / "locks" / f"{key.replace(':', '__s')}.lock").unlink(missing_ok=True)


def run_queue(args, keys):
    import torch

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    while True:
        ran = _run_pass(args, keys)
        pending = [k for k in keys if not _done(Path(args.workdir), k)]
        if not pending or not args.wait:
            return
        if not ran:
            time.sleep(60)  # the remaining runs wait for a reward model or are held by another worker


def _done(workdir: Path, key: str) -> bool:
    name, seed = key.split(":")
    rec = workdir / "runs" / f"{name}__s{seed}.json"
    return rec.is_file() and bool(json.loads(rec.read_text()).get("done"))


_WAITING: set = set()


def rm_ready(rms: Path, name: str) -> bool:
    """An artifact is complete once its manifest (written last) is there; older ones have none, only the spec."""
    d = rms / name
    return (d / "manifest.json").is_file() or ((d / "rlhf_ext_reward.json").is_file() and
                                               not d.with_name(d.name + ".tmp").exists() and
                                               (d / "heads.safetensors").is_file())


def _run_pass(args, keys) -> bool:
    st = settings(args.quick, args.prompts)
    workdir, rms = Path(args.workdir), rm_dir(args)
    ran = False
    for key in keys:
        name, seed = key.split(":")
        if _done(workdir, key):
            continue
        need = sorted(proxies_for([key]))  # also the proxy axis at evaluation
        if not args.quick and not all(rm_ready(rms, r) for r in need):
            rm = next(r for r in need if not rm_ready(rms, r))
            if key not in _WAITING:
                _WAITING.add(key)
                print(f"[{key}] waiting for reward model {rm} (python benchmarks/overoptimization.py rms)", flush=True)
            continue
        if not claim(workdir, key):
            continue
        try:
            (LoopRun if "loop" in VARIANTS[name] else Run)(name, int(seed), args, st).execute()
            ran = True
        finally:
            release(workdir, key)
    return ran
