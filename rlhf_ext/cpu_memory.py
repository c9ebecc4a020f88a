"""Keep freed memory in the process's heap on CPU, so that each PPO pass does not page-fault its tensors back in.

Why: torch's CPU tensors come from glibc's malloc. glibc serves every block above its mmap threshold (128 KiB at
first, rising with use to at most 32 MiB) with a fresh `mmap` and hands it back to the kernel on `free`, and it trims
the top of the heap whenever more than twice that threshold lies free there. A PPO iteration allocates the same
activation sizes pass after pass, so each pass touches hundreds of MB of new pages: on the fp32 SmolLM2-135M
benchmark a training forward + backward took 100–220 k minor page faults, about a fifth of the update's wall time
(`python benchmarks/ppo_throughput.py`, README "Throughput"). Raising both thresholds keeps the freed blocks for the
next pass; the peak RSS does not rise (the next pass reuses them), but RSS stays at its high-water mark until the
process ends, as it does under jemalloc or tcmalloc.

It is a setting of the process, not of one trainer, and glibc cannot be put back (setting a threshold ends its
dynamic one for good): once set, it stays for whatever the process runs next — a later trainer built with
`cpu_keep_freed_memory=False` (a sweep, a notebook) and the user's own code, whose freed tensors are kept too. Such a
trainer says so (`keep_freed_memory_for`: 'set earlier').
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap; the heap is never trimmed below 1 GiB free
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
_set_in_process = False  # keep_freed_memory() raised the thresholds in this process (for good)


def user_malloc_settings() -> list[str]:
    """The glibc malloc settings the environment already makes (those win: e.g. a memory measurement that wants RSS
    to follow the live tensors sets MALLOC_MMAP_THRESHOLD_)."""
    found = [name for name in USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        found.append("GLIBC_TUNABLES")
    return found


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring). Returns what happened:
    'set'; 'user' when the environment sets malloc itself (left as it is); 'unavailable' where the C library is not
    glibc (musl, macOS, Windows: nothing to do) or refuses the value."""
    if user_malloc_settings():
        return "user"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return "unavailable"
    if not hasattr(libc, "gnu_get_libc_version"):  # musl also has a mallopt, which does nothing
        return "unavailable"
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 1 on success; setting either also stops glibc from moving them itself (its dynamic threshold)
    global _set_in_process
    ok = mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    _set_in_process = _set_in_process or ok
    return "set" if ok else "unavailable"


def keep_freed_memory_for(args) -> str:
    """What a trainer does at start-up with its `args` (PPOConfig or RewardEnsembleConfig): `keep_freed_memory()` on
    CPU when `args.cpu_keep_freed_memory`, else 'off' — or 'set earlier' where an earlier trainer of this process set
    it, which `cpu_keep_freed_memory=False` cannot undo (module docstring)."""
    if args.cpu_keep_freed_memory and args.device.type == "cpu":
        return keep_freed_memory()
    return "set earlier" if _set_in_process else "off"
