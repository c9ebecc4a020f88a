"""Data parallel through accelerate: 2 CPU processes (gloo) launched with `accelerate launch` and
recipes/accelerate_configs/cpu_2proc.yaml. What a user expects data parallelism to mean: each process trains on
a disjoint half of the batch, the adapters stay identical on both ranks, the KL guard holds on every iteration, and
the result equals one process training on the whole batch (within float tolerance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _launch(out, modes, *extra, world, port=0, launch_flags=()):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = [str(ROOT / "tests" / "ddp_worker.py"), str(out), ",".join(modes), "8", *extra]
    if world == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "recipes/accelerate_configs/cpu_2proc.yaml"),
               "--main_process_port", str(29640 + port), *launch_flags, *worker]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in range(world) if world > 1 else ():  # a live gloo group at interpreter teardown can abort (SIGABRT)
        assert json.loads((out / f"exit_r{rank}.json").read_text()) == {"initialized": False}


def _ranks(out, mode, world):
    return [json.loads((out / mode / f"info_w{world}_r{i}.json").read_text()) for i in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    """The PPO and reward jobs, once in one process with the whole batch and once in 2 processes with half each (the
    monitor's job too): one process and one launch for them all, as each costs ~10 s of imports on 2 cores."""
    from rlhf_ext.testing import save_tiny_model

    out = tmp_path_factory.mktemp("ddp")
    base = save_tiny_model(out / "base", tok)  # written once here: two ranks saving the same folder would race
    wide = save_tiny_model(out / "base64", tok, hidden_size=64)  # the 4-bit runs' (bitsandbytes' CPU block)
    _launch(out / "w1", ["reward", "ppo", "ppo_4bit"], base, wide, world=1)
    _launch(out / "w2", ["reward", "ppo", "monitor", "reward_gc", "ppo_gc", "ppo_4bit", "ppo_resume", "ungraded",
                                 "reward_signal"], base,
            wide, world=2)
    return out


def _run(runs, mode, world):
    out = runs / f"w{world}"
    return [(info, load_file(str(out / mode / f"params_w{world}_r{i}.safetensors")))
            for i, info in enumerate(_ranks(out, mode, world))]


def _close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


@pytest.mark.parametrize("mode", ["ppo", "reward"])
def test_two_processes_equal_one_process_with_the_whole_batch(runs, mode):
    (i1, p1), = _run(runs, mode, world=1)
    (ia, pa), (ib, pb) = _run(runs, mode, world=2)
    assert ia["world"] == ib["world"] == 2 and ia["wrapped"] == "DistributedDataParallel"
    _close(pa, pb, 0.0)  # the same adapters on both ranks, bit for bit
    if mode == "ppo":
        assert not set(ia["first_batch"]) & set(ib["first_batch"])  # disjoint halves ...
        assert sorted(ia["first_batch"] + ib["first_batch"]) == sorted(i1["first_batch"])  # ... of the same batch
        assert ia["kl_after"] == ib["kl_after"] and all(k <= 0.005 + 1e-6 for k in ia["kl_after"])
        assert ia["backtracks"] > 0  # the guard acted, identically on both ranks
        assert ia["kl_after"] == pytest.approx(i1["kl_after"], abs=1e-4)
        # log_metric: the mean over both ranks' values is one process's over the whole batch, on every rank
        assert ia["logged"] == ib["logged"] and [r for _, r in ia["logged"]] == [1.0] * 3
        assert [m for m, _ in ia["logged"]] == pytest.approx([m for m, _ in i1["logged"]], abs=1e-6)
    else:
        assert not set(ia["pairs"]) & set(ib["pairs"]) and sorted(ia["pairs"] + ib["pairs"]) == sorted(i1["pairs"])
    moved = max(float(v.abs().max()) for k, v in p1.items() if "lora_B" in k)
    assert moved > 1e-3
    _close(pa, p1, 1e-4 * max(1.0, moved))


@pytest.mark.parametrize("mode", ["ppo", "reward"])
def test_gradient_checkpointing_under_ddp_equals_one_process(runs, mode):
    """The 7B recipes' `gradient_checkpointing: true` under the 2-process launch (multi_gpu.yaml's path, gloo here):
    each trainer ends where one process without checkpointing ends with the whole batch, the same on both ranks."""
    (i1, p1), = _run(runs, mode, world=1)
    (ia, pa), (ib, pb) = _run(runs, f"{mode}_gc", world=2)
    assert ia["wrapped"] == "DistributedDataParallel" and ia["checkpointing"] and ib["checkpointing"]
    assert not i1["checkpointing"]
    _close(pa, pb, 0.0)
    moved = max(float(v.abs().max()) for k, v in p1.items() if "lora_B" in k)
    _close(pa, p1, 1e-4 * max(1.0, moved))


def test_a_4bit_base_under_ddp_equals_one_process(runs):
    """QLoRA under the 2-process launch (each rank quantises and holds its own NF4 base; only the adapters are in
    DDP): disjoint halves of the batch, the same adapters on both ranks, KL ≤ δ, and one 4-bit process's result with
    the whole batch."""
    (i1, p1), = _run(runs, "ppo_4bit", world=1)
    (ia, pa), (ib, pb) = _run(runs, "ppo_4bit", world=2)
    assert ia["wrapped"] == "DistributedDataParallel"
    assert sorted(ia["first_batch"] + ib["first_batch"]) == sorted(i1["first_batch"])
    assert ia["kl_after"] == ib["kl_after"] and all(k <= 0.005 + 1e-6 for k in ia["kl_after"])
    _close(pa, pb, 0.0)
    moved = max(float(v.abs().max()) for k, v in p1.items() if "lora_B" in k)
    assert moved > 1e-3
    _close(pa, p1, 1e-4 * max(1.0, moved))


@pytest.mark.parametrize("mixed_precision, dtype, port", [("bf16", "bfloat16", 2), ("fp16", "float16", 3)])
def test_16_bit_under_ddp_is_one_precision(tmp_path, mixed_precision, dtype, port):
    """`mixed_precision: bf16` from the launcher (as recipes/accelerate_configs/multi_gpu.yaml sets it; fp16 on GPUs
    before Ampere), 2 processes: every pass runs in that dtype, so with the policy untouched every KL reads exactly 0
    (before: objective/kl 3.4e-4, the training forward alone under autocast), and the hard KL bound holds against the
    independent oracle (in the same dtype) on the union of both ranks' batches; evaluation gives one number for both
    ranks. The prompts share a 26-token header, so every pass after sampling runs it once (the shared prompt prefix)
    on each rank. Under fp16 both ranks keep one loss scale and end with the same adapters (one rank's non-finite
    loss and an overflow: the test after the next)."""
    _launch(tmp_path, ["precision"], world=2, port=port, launch_flags=("--mixed_precision", mixed_precision))
    ranks = _ranks(tmp_path, "precision", 2)
    for info in ranks:
        still, guarded = info["still"], info["guarded"]
        assert still["mixed_precision"] == mixed_precision and still["compute_dtype"] == dtype
        assert (guarded["loss_scale"][-1] is not None) == (mixed_precision == "fp16")
        assert still["sharing"] == guarded["sharing"] == "on"
        assert still["startup_kl"] <= 1e-9
        assert all(k == 0.0 for k in still["objective/kl"])
        assert all(k == 0.0 for k in still["kl/before_update"] + still["kl/after_update"])
        assert all(abs(e) <= 1e-9 for e in still["exact"])
        assert all(k <= 0.1 for k in guarded["kl/after_update"])
    a, b = ranks[0]["guarded"], ranks[1]["guarded"]
    assert a["kl/after_update"] == b["kl/after_update"]  # one decision for both ranks
    # evaluation (eval_on_start + every iteration, 10 prompts): each rank samples its 5, both log the mean of all 10;
    # the untouched policy is the reference there too
    for phase in ("still", "guarded"):
        evals = [r[phase]["evals"] for r in ranks]
        assert [e["step"] for e in evals[0]] == [0, 1, 2] and evals[0] == evals[1], evals
        assert ranks[0][phase]["one_prompt"] == ranks[1][phase]["one_prompt"]
        # the card's held-out table is the logged (global) mean, not this rank's half of the prompts
        assert [r[phase]["heldout"]["kl_mean"] for r in ranks] == [evals[0][-1]["eval_kl"]] * 2
    assert all(e["eval_kl"] == 0.0 for e in ranks[0]["still"]["evals"])
    assert ranks[0]["guarded"]["evals"][-1]["eval_kl"] > 0
    for it, logged in enumerate(a["kl/after_update"]):
        exact = (a["exact"][it] + b["exact"][it]) / 2  # the guard bounds the mean over the global batch
        assert exact <= 0.1 + 1e-4 and abs(exact - logged) <= 1e-4 + 1e-3 * exact, (it, exact, logged)
    assert max(a["kl/after_update"]) > 0.02  # the policy did move
    assert a["loss_scale"] == b["loss_scale"] and a["lora_B"] == b["lora_B"] > 0


def test_monitor_decides_once_for_all_ranks(runs):
    """Detectors see the whole batch (gathered from both processes), so a halt stops every rank at the same
    iteration with one checkpoint written — before, a halt taken on one rank's data stopped that rank alone and the
    other crashed in gloo. Logged metrics are means over the whole batch, not rank 0's."""
    a, b = _ranks(runs / "w2", "monitor", 2)
    assert a["halted_by"] == b["halted_by"] == "batch_seen"
    assert a["iterations"] == b["iterations"] == 2  # warmup 2: the first iteration it may fire
    assert a["checkpoints"] == b["checkpoints"] == ["checkpoint-2"]
    assert a["logged"] == b["logged"]
    for it, logged in enumerate(a["logged"]):
        assert logged["monitor/batch_seen"] > 6  # it saw 8 samples (smoothed), not 4
        la, lb = a["local"][it], b["local"][it]
        assert logged["objective/scores"] == pytest.approx((la["scores"] + lb["scores"]) / (la["n"] + lb["n"]))
        assert logged["response/length_mean"] == pytest.approx((la["length"] + lb["length"]) / 2)


def test_a_process_whose_whole_share_goes_ungraded_does_not_stop_the_run(runs):
    """Every reward on rank 0 is None: that process raised "every sample of the batch got a non-finite reward" on
    its own share and the other died in gloo, where one process with the same global batch trains on. At
    evaluation, rank 0 grades nothing and rank 1 grades 10: the audit's mean is 10 on both ranks (it was NaN)."""
    ranks = _run(runs, "ungraded", world=2)
    (ia, pa), (ib, pb) = ranks
    assert ia["dropped"] == ib["dropped"] == [4, 4]
    assert ia["eval"]["eval_judge"] == ib["eval"]["eval_judge"] == 10.0
    assert ia["eval"] == ib["eval"]
    _close(pa, pb, 0.0)


def test_a_signal_to_one_process_stops_every_process_after_the_same_reward_step(runs):
    """SIGTERM to rank 1 alone during step 2: the processes agree on the step to stop after (one reduction per step),
    checkpoint-2 is saved, and both stop as SIGTERM means (143; the other used to stop as a Ctrl-C, which the
    launcher's summary reported as "Signal 2 (SIGINT) received" by a process nobody signalled). A rank stopping alone
    would leave its peer waiting in gloo."""
    a, b = _ranks(runs / "w2", "reward_signal", 2)
    assert (a["step"], b["step"]) == (2, 2) and a["checkpoints"] == b["checkpoints"] == ["checkpoint-2"]
    assert (a["raised"], b["raised"]) == ("SystemExit", "SystemExit")


def test_a_two_process_run_resumes_exactly(runs):
    """Stopped after iteration 2 and resumed (a fresh trainer, another process state), a 2-process run ends where the
    same run straight through ends, loss for loss and parameter for parameter, on both ranks: the checkpoint holds
    each process's own random stream. (Before, rank 1's stream was never saved and both were reseeded after the
    load: from iteration 3 on the samples, and so the losses, differed.)"""
    ranks = _run(runs, "ppo_resume", world=2)
    for info, params in ranks:
        assert info["resumed_iterations"] == 4 and len(info["resumed"]) == 4
        assert info["resumed"] == info["whole"]  # sampled responses, scores, β: bit for bit
        whole = {k.removeprefix("whole."): v for k, v in params.items() if k.startswith("whole.")}
        resumed = {k.removeprefix("resumed."): v for k, v in params.items() if k.startswith("resumed.")}
        _close(resumed, whole, 0.0)
    assert ranks[0][0]["whole"] == ranks[1][0]["whole"]  # what is logged is the global batch's


def test_resuming_with_another_number_of_processes_reseeds_and_says_so(runs, tok):
    """The 2-process checkpoint resumed by one process: its two random streams cannot be dealt out to one, so the
    process is reseeded (deterministically: seed + 1000·rank + iteration), and the warning says so beside the
    changed process count."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.testing import tiny_causal_lm

    ckpt = runs / "w2" / "ppo_resume" / "half" / "checkpoint-2"
    data = Dataset.from_dict({"prompt": [f"write a short review of the {s} ." for s in "movie book song film".split()]})

    def resumed(seed_before):
        args = PPOConfig(str(runs / "w1" / "resumed_from_w2"), per_device_train_batch_size=4, max_steps=3,
                         learning_rate=3e-2, max_completion_length=6, kl_controller="lagrangian", kl_target=0.5,
                         use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1000, seed=0, monitor=False,
                         shapers=[{"name": "debias"}])
        tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=lambda completion_ids, **kw: [0.0] * len(completion_ids),
                        args=args, train_dataset=data, processing_class=tok,
                        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(seed_before)
        with pytest.warns(UserWarning) as caught:
            tr.train(resume_from_checkpoint=str(ckpt))
        return tr, " ".join(str(w.message) for w in caught)

    (a, said), (b, _) = resumed(1), resumed(2)
    assert "num_processes: 2 in the checkpoint, 1 now" in said
    assert "holds the random streams of 2 process(es) and this run has 1" in said and "reseeded" in said
    assert a.rollout.texts == b.rollout.texts  # deterministic: the state before the resume does not matter


def test_two_process_runs_exit_cleanly():
    """A finished two-process run must exit 0. gloo's worker threads drop their last collective a moment after Python
    returned from it; inside interpreter finalization that aborts the process (SIGABRT) while a DDP model still holds
    the group — CI failed on it once. 8 rounds of a job shaped like a run's end, each rank closing the group as the
    trainers do: without the close, 3 of 24 rounds aborted here (tests/gloo_exit_worker.py), so 8 clean rounds
    would come by chance about one time in three. Each round is two fresh interpreters (~5 s); that the trainers
    close the group at all is checked on every launch above (`exit_r*.json`), deterministically."""
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "gloo_exit_worker.py"), "8", "close"], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(codes) == 8 and all(c == [0, 0] for c in codes), codes


def _fp16_ranks(rank: int, port: int, out: str) -> None:
    """One rank of the test below: PPOTrainer._step itself on a DDP-wrapped layer under fp16 autocast."""
    import types
    from collections import Counter

    import torch
    import torch.distributed as dist

    from rlhf_ext.adapters import GradientReachCheck  # (no adapter matrices: decided at the first step)
    from rlhf_ext.ppo.trainer import PPOTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    ddp = torch.nn.parallel.DistributedDataParallel(layer)
    reduce = lambda t, reduction="sum": (dist.all_reduce(t), t)[1]  # noqa: E731
    tr = types.SimpleNamespace(grad_scaler=torch.amp.GradScaler("cpu"), version=0, _global_sum=reduce,
                               optimizer=torch.optim.SGD(layer.parameters(), lr=0.1), _reach_check=GradientReachCheck({}, "t"),
                               accelerator=types.SimpleNamespace(backward=lambda loss: loss.backward(),
                                                                 num_processes=2, reduce=reduce),
                               trainable_parameters=lambda: list(layer.parameters()),
                               args=types.SimpleNamespace(max_grad_norm=1.0, device="cpu"))
    stats, seen = Counter(), []
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ddp(torch.ones(2, 4)).float().mean()
        if step == 0 and rank == 0:
            loss = loss * float("inf")  # this rank's forward overflowed; the other's loss is finite
        norm = PPOTrainer._step(tr, loss, stats)
        seen.append([None if norm is None else round(norm, 6), tr.grad_scaler.get_scale()])
    seen.append(dict(stats))
    seen.append(layer.weight.detach().tolist())
    Path(out, f"r{rank}.json").write_text(json.dumps(seen))
    # leave without destructors: the DDP reducer, freed on return with the GIL held, joins gloo's worker threads while
    # one may still be freeing the last all-reduce's tensors, which needs the GIL — a deadlock seen once in the suite
    os._exit(0)


def test_fp16_ranks_keep_one_loss_scale_when_one_ranks_loss_is_not_finite(tmp_path):
    """A non-finite loss on one rank reaches the other only as NaN gradients (all-reduced in the backward): the first
    kept its scale (a non-finite loss), the second halved it (an overflow) — their scales, and from then on their
    adapters, drifted apart without an error. Both now decide on the global loss: the same steps skipped, one scale,
    the same weights."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fp16_ranks, args=(port, str(tmp_path)), nprocs=2)
    a, b = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert a == b
    assert a[-2]["optim/skipped_nonfinite_steps"] == 1 and a[0][1] == 2.0 ** 16  # a non-finite loss keeps the scale
