"""Run by tests/test_data_parallel.py::test_two_process_runs_exit_cleanly: ROUNDS two-process gloo jobs shaped like
the end of a data-parallel run — collectives, then the group still held (as a DDP model holds it) when the
interpreter exits. Prints the ranks' exit codes as JSON, one list per round.

    python tests/gloo_exit_worker.py ROUNDS {close|none}

`close`: each rank calls `rlhf_ext.distributed.close_process_group_at_exit()`, as the trainers do. Without it about
one round in six aborted with SIGABRT (exit code -6) on 2 cores (measured: 5 of 30).
"""

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HELD = None


def _distributed_module():
    # by path: importing the rlhf_ext package would load transformers in every spawned process (seconds each)
    spec = importlib.util.spec_from_file_location(
        "rlhf_ext_distributed", Path(__file__).resolve().parents[1] / "rlhf_ext" / "distributed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rank(rank: int, port: int, close: bool):
    global HELD
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if close:
        _distributed_module().close_process_group_at_exit()
    HELD = dist.distributed_c10d._get_default_group()  # what a DDP model keeps until the interpreter ends
    for _ in range(3):
        out = [torch.empty(4) for _ in range(2)]
        dist.all_gather(out, torch.full((4,), float(rank)))
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    rounds, close = int(sys.argv[1]), sys.argv[2] == "close"
    ctx, codes = mp.get_context("spawn"), []
    for _ in range(rounds):
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, port, close)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        codes.append([p.exitcode for p in procs])
    print(json.dumps(codes))
