"""PPO checkpoints: atomic, checksummed and complete — policy and critic adapters, value head, the KL guard's
anchor, optimizer and scheduler (and fp16's loss scale), controller, reward-pipeline and monitor state, RNG and data
position — so a killed run resumes exactly where it stopped. `resume_from_checkpoint=True` takes the newest checkpoint
that verifies."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import warnings
from array import array
from pathlib import Path

import numpy as np
import torch

from ..integrity import (CorruptFileError, atomic_folder, checkpoint_fix, earlier_checkpoints, load_safetensors,
                         newest_verified_checkpoint, read_json, remove_checkpoints, remove_oldest_checkpoints,
                         save_tensors, verify_manifest)
from ..interrupt import random_streams, set_random_streams
from ..models import model_fingerprint
from ..trainer_state import TRAINER_STATE, restore_trainer_state, save_trainer_state

CHECKPOINT_FILES = ("ppo_state.json", "value_head.safetensors", "optimizer.pt", "rng.safetensors", "anchor.safetensors")
# What shapes the trajectory: resumed with other values, a run continues, but not as the run that wrote the checkpoint
# (warned on resume, as transformers' Trainer warns for its batch size; a changed default must not pass unnoticed)
TRAJECTORY_SETTINGS = ("per_device_train_batch_size", "num_ppo_epochs", "num_mini_batches", "max_completion_length",
                       "learning_rate", "kl_controller", "kl_target", "seed", "data_seed", "cpu_fast_sampling")
# What to do about a changed setting where "pass the checkpoint's value" is not the whole answer
_CHANGED_HINT = {"base_model_fingerprint": "the adapters were trained on another base model: load the checkpoint's "
                                           "for a continuation of that run",
                 "prompts": "another train_dataset: the saved position in the prompt order now points into other "
                            "prompts"}


def _trajectory_settings(tr) -> dict:
    return {k: getattr(tr.args, k) for k in TRAJECTORY_SETTINGS} | {
        "num_processes": tr.accelerator.num_processes,
        # the weights, however the model was named or loaded (models.model_fingerprint): another base warns by name
        "base_model_fingerprint": model_fingerprint(tr.policy.peft),
        "prompts": prompts_fingerprint(tr.prompts)}


def _stream_read_further(tr, saved: dict, now: dict) -> dict:
    """A streamed prompt set is read as far as `max_steps` needs: resumed with a larger max_steps (the way to go on),
    this run holds more prompts than the checkpoint's run read. Where the checkpoint's prompts are this run's first
    ones, they are the same prompts and compare as such."""
    was = saved.get("prompts")
    if not (tr.streamed and isinstance(was, str) and was != now["prompts"]):
        return now
    n = int(was.split(" ", 1)[0])
    return {**now, "prompts": was} if n < len(tr.prompts) and prompts_fingerprint(tr.prompts[:n]) == was else now


def prompts_fingerprint(prompts) -> str:
    """How many prompts and a digest of their token ids: the data a checkpoint's `data_pos` indexes into."""
    h = hashlib.sha256()
    for _, ids in prompts:
        h.update(array("q", [len(ids), *ids]).tobytes())
    return f"{len(prompts)} prompts, sha256 {h.hexdigest()[:12]}"


def _changed(key: str, was, now) -> str:
    hint = _CHANGED_HINT.get(key)
    return f"{key}: {was!r} in the checkpoint, {now!r} now" + (f" ({hint})" if hint else "")


def _warn_if_settings_changed(path, saved: dict | None, now: dict) -> None:
    changed = [_changed(k, saved[k], v) for k, v in now.items() if saved and k in saved and saved[k] != v]
    if changed:
        warnings.warn(f"Resuming from {path} with other settings than the run that wrote it ({'; '.join(changed)}). "
                      "Training continues with the new values, so it is not that run continued; pass the "
                      "checkpoint's values for an exact continuation.", UserWarning, stacklevel=3)


# ------------------------------------------------------------------- what each process holds of its own (DDP)
def process_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random streams: torch's CPU generator, its GPU's where the policy runs on one, and NumPy's
    global one (transformers' Trainer saves it too: reward functions and judges draw from it)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch_rng": torch.get_rng_state(),
             "numpy_rng": torch.tensor([pos, has_gauss, *keys.tolist()], dtype=torch.int64),
             "numpy_gauss": torch.tensor([gauss], dtype=torch.float64)}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def process_state(tr) -> dict:
    """What differs from process to process under DDP: its random streams (each samples its own responses) and its
    reward pipeline's running statistics (each scores its own share of the batch: debias's slope, a callable's
    running mean)."""
    return {"rng": process_rng_state(tr.policy.device), "rewards": tr.rewards.state_dict()}


def gather_process_states(tr) -> list[dict]:
    """`process_state` of every process, rank by rank. Only the main process writes checkpoints, so under DDP this is
    a collective — every process calls it at the same point (before each save) — that hands the main process all of
    them."""
    own = process_state(tr)
    if tr.accelerator.num_processes == 1:
        return [own]
    import torch.distributed as dist

    states = [None] * tr.accelerator.num_processes
    dist.all_gather_object(states, own)
    return states


# ------------------------------------------------------------- an iteration that fails before it trains (one process)
def undo_point(tr) -> dict:
    """What an iteration changes before its first optimizer step, as it stands at the iteration's start: the random
    streams (sampling), the position in the prompts, the reward pipeline's statistics (scoring), the token count,
    the scheduler, controller and fp16 loss scale (an iteration whose every sample was dropped steps the schedule
    without training). The monitor observes after the iteration (its `on_step_end`). Small: no tensor of the model.
    `undo_iteration` puts it back, so that an iteration failing before it trains — a reward server down, a prompt
    the tokenizer refuses — leaves the run as the iterations that finished left it, to be saved
    (`PPOTrainer._save_after_failure`) and resumed as if the failure had never happened."""
    return copy.deepcopy({"rng": random_streams(),
                          "data": (tr.data_epoch, tr.data_pos, tr.version), "rewards": tr.rewards.state_dict(),
                          "tokens": tr.state.num_input_tokens_seen, "scheduler": tr.lr_scheduler.state_dict(),
                          "kl_controller": tr.kl_ctl.state_dict(),
                          "scaler": tr.grad_scaler.state_dict() if tr.grad_scaler is not None else None})


def undo_iteration(tr, point: dict) -> None:
    set_random_streams(point["rng"])
    tr.data_epoch, tr.data_pos, tr.version = point["data"]
    tr.rewards._set_state(point["rewards"])
    tr.state.num_input_tokens_seen = point["tokens"]
    tr.lr_scheduler.load_state_dict(point["scheduler"])
    tr.kl_ctl.load_state_dict(point["kl_controller"])
    if point["scaler"] is not None:
        tr.grad_scaler.load_state_dict(point["scaler"])
    # what the failed iteration left in this process: gradients of a backward that reached no optimizer step, values
    # reward functions passed to log_metric / log_extra, the kept θ_old forward and the rollout (an OOM's memory) —
    # a retry in this process (train() again, or resume_from_checkpoint on this trainer) would add them to its own
    tr.optimizer.zero_grad(set_to_none=True)
    tr._pending_metrics, tr._pending_extra = {}, {}
    tr._memo.clear()
    tr.rollout = None


def _states_to_save(tr) -> list[dict]:
    # Under DDP: what `_save_and_rotate` gathered from every process just before. One process (or save_checkpoint()
    # called on the main process alone): its own state as it is now.
    return getattr(tr, "_process_states", None) or [process_state(tr)]


def _rng_key(key: str, rank: int) -> str:
    return key if rank == 0 else f"{key}.rank{rank}"  # rank 0's under the names checkpoints always used


def _set_process_rng(tr, saved: dict, rank: int = 0) -> None:
    """Put back `process_rng_state`'s streams (rank `rank`'s, under the names a checkpoint keeps them by)."""
    torch.set_rng_state(saved[_rng_key("torch_rng", rank)])
    numpy = saved.get(_rng_key("numpy_rng", rank))
    if numpy is not None:  # checkpoints before it held none
        pos, has_gauss, *keys = numpy.tolist()
        np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss,
                             float(saved[_rng_key("numpy_gauss", rank)])))
    cuda = saved.get(_rng_key("cuda_rng", rank))
    if cuda is not None and tr.policy.device.type == "cuda":
        torch.cuda.set_rng_state(cuda, tr.policy.device)


def _restore_rng(tr, path: Path, saved: dict, written_by: int) -> None:
    """Each process takes its own saved streams back. A checkpoint with another number of streams than this run has
    processes (another launch, or written before every process's stream was saved) cannot be dealt out one per
    process: each is reseeded from the seed, its rank and the iteration, deterministically, and a warning says so."""
    world, rank = tr.accelerator.num_processes, tr.accelerator.process_index
    streams = sum(1 for k in saved if k == "torch_rng" or k.startswith("torch_rng.rank"))
    if streams == world and _rng_key("torch_rng", rank) in saved:
        _set_process_rng(tr, saved, rank)
        return
    tr._seed_process_rng()
    if tr.accelerator.is_main_process:
        why = (f"resume with {written_by} process(es) to continue it exactly" if written_by != world else
               "it was written before checkpoints held every process's random stream")
        warnings.warn(f"{path} holds the random streams of {streams} process(es) and this run has {world}: each "
                      f"process's stream is reseeded (seed + 1000·rank + iteration), so sampling goes on "
                      f"deterministically but not as the run that wrote it would have sampled ({why}).", UserWarning,
                      stacklevel=3)


def _own_rewards_state(tr, state: dict) -> dict:
    """This process's reward-pipeline state: its own where the checkpoint has one per process of this run's, else the
    main process's (another number of processes, or a checkpoint from one process or from before they were kept)."""
    by_process = state.get("rewards_by_process")
    if by_process and len(by_process) == tr.accelerator.num_processes:
        return by_process[tr.accelerator.process_index]
    return state["rewards"]


# --------------------------------------------------------------------------------------------------- optimizer
def _follow_configured_lr(tr, saved_lr: float | None) -> None:
    """The optimizer and scheduler states carry the learning rate of the run that saved them (`saved_lr`, configured
    then). A resume with another `learning_rate` (which the settings check warns about) trains with the new one at the
    schedule's saved position: every group's base rate becomes the configured one and its current rate that base
    times the schedule's factor."""
    from torch.optim.lr_scheduler import LambdaLR

    lr, sched, groups = tr.args.learning_rate, tr.lr_scheduler, tr.optimizer.param_groups
    # the checkpoint's configured rate where it recorded one: a scheduler without base rates (ReduceLROnPlateau,
    # GreedyLR) offered its reduced current rate as the base, and the resume undid every reduction
    bases = ([saved_lr] * len(groups) if saved_lr is not None else
             list(getattr(sched, "base_lrs", None) or [g.get("initial_lr", g["lr"]) for g in groups]))
    if all(b == lr for b in bases):
        return  # untouched: a resume with the same settings stays bit-exact
    if isinstance(sched, LambdaLR):  # transformers' schedules: the factor is known at every step
        now = [lr * factor(sched.last_epoch) for factor in sched.lr_lambdas]
    else:  # any other: the saved rate scaled as its base is
        now = [g["lr"] * lr / b if b else lr for g, b in zip(groups, bases)]
    for g, rate in zip(groups, now):
        g["lr"], g["initial_lr"] = rate, lr
    if hasattr(sched, "base_lrs"):
        sched.base_lrs = [lr] * len(groups)
    if hasattr(sched, "_last_lr"):
        sched._last_lr = list(now)


def place_schedule_at(tr, iterations: int) -> None:
    """Put a LambdaLR schedule (transformers' named ones) at the position of `iterations`, and the optimizer's rate
    with it: a run continued or resumed with another length (the optimizer's state holds the shorter run's last
    rate, 0 at the end of a linear decay), or a checkpoint from before the schedule counted iterations (it stepped
    once per optimizer step, planned over iterations × epochs × minibatches). The same float as stepping there."""
    from torch.optim.lr_scheduler import LambdaLR

    sched = tr.lr_scheduler
    if not isinstance(sched, LambdaLR):
        return
    sched.last_epoch = iterations
    rates = [base * factor(iterations) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, rate in zip(tr.optimizer.param_groups, rates):
        group["lr"] = rate
    sched._last_lr = rates


def write_checkpoint(tr, final) -> str:
    """Everything a run needs to continue exactly, in one atomic, checksummed folder (under DDP every process's random
    streams and reward statistics with it: `gather_process_states`). A failed write (a full disk) is one OSError
    naming the checkpoint and the cause, saying the previous checkpoint is intact and how to resume
    (`integrity.writing_folder`); nothing of this one is left."""
    with atomic_folder(final, fix=checkpoint_fix(final)) as tmp:
        tr.policy.peft.save_pretrained(tmp / "adapters", selected_adapters=tr.trained_adapters,
                                         safe_serialization=True)
        save_tensors(tr.policy.value_head.state_dict(), tmp / "value_head.safetensors")
        save_tensors({str(i): a for i, a in enumerate(tr.kl_guard.anchor)} if tr.kl_guard is not None else {},
                     tmp / "anchor.safetensors")
        torch.save({"optimizer": tr.optimizer.state_dict(), "scheduler": tr.lr_scheduler.state_dict(),
                    **({"grad_scaler": tr.grad_scaler.state_dict()} if tr.grad_scaler is not None else {})},
                   tmp / "optimizer.pt")
        per_process = _states_to_save(tr)
        save_tensors({_rng_key(key, rank): t for rank, own in enumerate(per_process) for key, t in own["rng"].items()},
                     tmp / "rng.safetensors")
        state = {"iteration": tr.iteration, "data_epoch": tr.data_epoch, "data_pos": tr.data_pos,
                 "version": tr.version, "kl_controller": tr.kl_ctl.state_dict(),
                 "rewards": per_process[0]["rewards"], "python_rng": _jsonable(random.getstate()),
                 "monitor": tr.monitor.state_dict() if tr.monitor else None, "metrics_unlogged": _unlogged(tr),
                 "settings": _trajectory_settings(tr), "lr_schedule_unit": "iteration"}
        if len(per_process) > 1:  # "rewards" stays the main process's: what checkpoints always held
            state["rewards_by_process"] = [own["rewards"] for own in per_process]
        (tmp / "ppo_state.json").write_text(json.dumps(state))
        save_trainer_state(tr, tmp / TRAINER_STATE)  # log history, best metric, EarlyStoppingCallback's counter …
    return str(final)


def read_checkpoint(tr, path) -> None:
    """Restore `tr` from a checkpoint folder, every file verified against the manifest first (a damaged file is
    named)."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    fix = ("Resume from an earlier checkpoint-N folder of the same output_dir, or pass "
           "resume_from_checkpoint=True to take the newest complete one.")
    if not (path / "manifest.json").is_file() and not (path / "anchor.safetensors").is_file() \
            and (path / "ppo_state.json").is_file():
        raise ValueError(f"{path} was written by rlhf_ext 0.1 (no manifest.json, no anchor.safetensors), whose PPO "
                         f"checkpoints this version cannot resume. Start a new run (another output_dir, or "
                         f"overwrite_output_dir=True); its policy adapter is in {path / 'adapters'} "
                         f"(peft.PeftModel.from_pretrained(base, folder, subfolder=ADAPTER_NAME)).")
    required = CHECKPOINT_FILES + tuple(
        f"adapters/{a if a != 'default' else ''}/adapter_model.safetensors".replace("//", "/")
        for a in tr.trained_adapters)
    verify_manifest(path, fix, required=required)
    # this run's settings before anything is loaded: an adapter file can carry base weights too (PEFT saves a
    # targeted embedding or tied LM head whole), which would make another base model look like the checkpoint's
    now = _trajectory_settings(tr)
    for a in tr.trained_adapters:
        sub = path / "adapters" / (a if a != "default" else "")
        set_peft_model_state_dict(tr.policy.peft, load_safetensors(sub / "adapter_model.safetensors", fix),
                                  adapter_name=a)
    tr._set_trainable()
    tr.policy.value_head.load_state_dict(load_safetensors(path / "value_head.safetensors", fix))
    if tr.kl_guard is not None:
        anchor = load_safetensors(path / "anchor.safetensors", fix)
        if len(anchor) == len(tr.kl_guard.anchor):
            tr.kl_guard.anchor = [anchor[str(i)] for i in range(len(anchor))]
    try:
        opt = torch.load(path / "optimizer.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 — a damaged pickle-free torch file: name it
        raise CorruptFileError(path / "optimizer.pt", f"unreadable ({e})", fix) from None
    tr.optimizer.load_state_dict(opt["optimizer"])
    tr.lr_scheduler.load_state_dict(opt["scheduler"])
    if tr.grad_scaler is not None and "grad_scaler" in opt:  # fp16: the scale the run had reached
        tr.grad_scaler.load_state_dict(opt["grad_scaler"])
    rng = load_safetensors(path / "rng.safetensors", fix)
    state = read_json(path / "ppo_state.json", fix)
    if state.get("lr_schedule_unit") != "iteration":
        place_schedule_at(tr, state["iteration"])
        if tr.accelerator.is_main_process:
            warnings.warn(f"{path} was written by an earlier rlhf_ext: its run stepped the learning-rate schedule "
                          f"once per optimizer step and, on CPU, drew tokens with torch.multinomial. It continues at "
                          f"iteration {state['iteration']} of today's per-iteration schedule"
                          + (" and sampler (cpu_fast_sampling=False draws as that run did)"
                             if tr.args.cpu_fast_sampling and tr.policy.device.type == "cpu" else "")
                          + ": not as that run would have continued.", UserWarning, stacklevel=3)
    settings = state.get("settings") or {}
    _follow_configured_lr(tr, settings.get("learning_rate"))
    if tr.accelerator.is_main_process:  # one warning, not one per process
        _warn_if_settings_changed(path, settings, _stream_read_further(tr, settings, now))
    tr.iteration, tr.data_epoch, tr.data_pos = state["iteration"], state["data_epoch"], state["data_pos"]
    tr.version = state.get("version", 0)
    # which controller saved it: recorded with its state since; before, only in the settings
    tr.kl_ctl.load_state_dict({"controller": settings.get("kl_controller", tr.kl_ctl.name), **state["kl_controller"]})
    tr.rewards.load_state_dict(_own_rewards_state(tr, state))
    if tr.monitor is not None and state.get("monitor"):
        tr.monitor.load_state_dict(state["monitor"])
    random.setstate(_untuple(state["python_rng"]))
    _restore_rng(tr, path, rng, settings.get("num_processes", tr.accelerator.num_processes))  # after the iteration
    tr._reach_check.done = True  # checked in the run that wrote the checkpoint
    if (path / TRAINER_STATE).is_file():  # checkpoints before it had none: their log history starts afresh
        restore_trainer_state(tr, path / TRAINER_STATE)
    tr._metrics_history = state["metrics"] if "metrics" in state else _whole_history(tr, state["metrics_unlogged"])
    tr.state.global_step = tr.iteration


def _unlogged(tr) -> list:
    """[[iteration, metrics], …] of the iterations the log history does not hold (logging_steps > 1): with it, every
    iteration's metrics once per checkpoint — both in full, a long run's checkpoints grew by twice its history."""
    logged = {e.get("step") for e in tr.state.log_history if "loss/policy" in e}
    return [[i, m] for i, m in enumerate(tr._metrics_history, 1) if i not in logged]


def _whole_history(tr, unlogged: list) -> list[dict]:
    """Every iteration's metrics in order, from the restored log history and the checkpoint's `_unlogged` rest."""
    by_iteration = {e["step"]: {k: v for k, v in e.items() if k != "step"} for e in tr.state.log_history
                    if "loss/policy" in e and "step" in e}
    by_iteration.update({i: m for i, m in unlogged})
    return [by_iteration[i] for i in sorted(by_iteration) if i <= tr.iteration]


def rotate_checkpoints(output_dir, newest: int, limit: int | None, keep: str | None = None) -> list[str]:
    """`save_total_limit`: after `checkpoint-{newest}` is written, delete the oldest checkpoints so that at most
    `limit` remain — only those numbered below `newest` (what this run passed through): a higher-numbered folder
    belongs to another run in the same output_dir and is never touched; nor is `keep` (the best checkpoint, as in
    transformers). Returns the removed paths."""
    return remove_oldest_checkpoints(output_dir, newest, limit, keep=keep)


def earlier_run(output_dir) -> list[str]:
    """What an earlier run left in `output_dir` that a new run there would mix with: its checkpoints (a later
    `resume_from_checkpoint=True` would continue *that* run) and its monitor log (the new iterations would be
    appended to it). Empty when there is none."""
    out = Path(output_dir)
    found = earlier_checkpoints(out)
    metrics = out / "monitor" / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("monitor/metrics.jsonl")
    return found


def clear_earlier_run(output_dir) -> None:
    """`overwrite_output_dir=True`: remove an earlier run's checkpoints and monitor logs (the review queue and the
    people's decisions in it are kept: they are labels, not the run's state)."""
    out = Path(output_dir)
    remove_checkpoints(out)
    from ..monitor.monitor import LOGS

    for name in (*LOGS, "run.json"):
        (out / "monitor" / name).unlink(missing_ok=True)


def newest_complete_checkpoint(output_dir) -> str | None:
    """The newest PPO `checkpoint-N` whose manifest verifies; damaged ones are skipped with a warning."""
    return newest_verified_checkpoint(output_dir, CHECKPOINT_FILES)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _untuple(x):
    return tuple(_untuple(v) for v in x) if isinstance(x, list) else x
