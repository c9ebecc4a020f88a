"""PPO checkpoints: atomic, checksummed and complete — policy and critic adapters, value head, the KL guard's
anchor, optimizer and scheduler, controller, reward-pipeline and monitor state, RNG and data position — so a killed
run resumes exactly where it stopped. `resume_from_checkpoint=True` takes the newest checkpoint that verifies."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import torch

from ..integrity import (CorruptFileError, atomic_folder, checkpoint_number, load_safetensors,
                         newest_verified_checkpoint, numbered_checkpoints, read_json, save_tensors, verify_manifest)

CHECKPOINT_FILES = ("ppo_state.json", "value_head.safetensors", "optimizer.pt", "rng.safetensors", "anchor.safetensors")
# What shapes the trajectory: resumed with other values, a run continues, but not as the run that wrote the checkpoint
# (warned on resume, as transformers' Trainer warns for its batch size; a changed default must not pass unnoticed)
TRAJECTORY_SETTINGS = ("per_device_train_batch_size", "num_ppo_epochs", "num_mini_batches", "max_completion_length",
                       "learning_rate", "kl_controller", "kl_target")


def _trajectory_settings(tr) -> dict:
    return {k: getattr(tr.args, k) for k in TRAJECTORY_SETTINGS} | {"num_processes": tr.accelerator.num_processes}


def _warn_if_settings_changed(path, saved: dict | None, now: dict) -> None:
    changed = [f"{k}: {saved[k]!r} in the checkpoint, {v!r} now" for k, v in now.items()
               if saved and k in saved and saved[k] != v]
    if changed:
        warnings.warn(f"Resuming from {path} with other settings than the run that wrote it ({'; '.join(changed)}). "
                      "Training continues with the new values, so it is not that run continued; pass the "
                      "checkpoint's values for an exact continuation.", UserWarning, stacklevel=3)


def write_checkpoint(tr, final) -> str:
    """Everything a run needs to continue exactly, in one atomic, checksummed folder."""
    with atomic_folder(final) as tmp:
        tr.policy.peft.save_pretrained(tmp / "adapters", selected_adapters=tr.trained_adapters,
                                         safe_serialization=True)
        save_tensors(tr.policy.value_head.state_dict(), tmp / "value_head.safetensors")
        save_tensors({str(i): a for i, a in enumerate(tr.kl_guard.anchor)} if tr.kl_guard is not None else {},
                     tmp / "anchor.safetensors")
        torch.save({"optimizer": tr.optimizer.state_dict(), "scheduler": tr.lr_scheduler.state_dict()},
                   tmp / "optimizer.pt")
        save_tensors({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
        state = {"iteration": tr.iteration, "data_epoch": tr.data_epoch, "data_pos": tr.data_pos,
                 "version": tr.version, "kl_controller": tr.kl_ctl.state_dict(),
                 "rewards": tr.rewards.state_dict(), "python_rng": _jsonable(random.getstate()),
                 "monitor": tr.monitor.state_dict() if tr.monitor else None, "metrics": tr._metrics_history,
                 "settings": _trajectory_settings(tr)}
        (tmp / "ppo_state.json").write_text(json.dumps(state))
    return str(final)


def read_checkpoint(tr, path) -> None:
    """Restore `tr` from a checkpoint folder, every file verified against the manifest first (a damaged file is
    named)."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    fix = ("Resume from an earlier checkpoint-N folder of the same output_dir, or pass "
           "resume_from_checkpoint=True to take the newest complete one.")
    required = CHECKPOINT_FILES + tuple(
        f"adapters/{a if a != 'default' else ''}/adapter_model.safetensors".replace("//", "/")
        for a in tr.trained_adapters)
    verify_manifest(path, fix, required=required)
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
    torch.set_rng_state(load_safetensors(path / "rng.safetensors", fix)["torch_rng"])
    state = read_json(path / "ppo_state.json", fix)
    _warn_if_settings_changed(path, state.get("settings"), _trajectory_settings(tr))
    tr.iteration, tr.data_epoch, tr.data_pos = state["iteration"], state["data_epoch"], state["data_pos"]
    tr.version = state.get("version", 0)
    tr.kl_ctl.load_state_dict(state["kl_controller"])
    tr.rewards.load_state_dict(state["rewards"])
    if tr.monitor is not None and state.get("monitor"):
        tr.monitor.load_state_dict(state["monitor"])
    random.setstate(_untuple(state["python_rng"]))
    tr._metrics_history = state["metrics"]
    tr._reach_checked = True  # checked in the run that wrote the checkpoint
    tr.state.global_step = tr.iteration


def rotate_checkpoints(output_dir, newest: int, limit: int | None) -> list[str]:
    """`save_total_limit`: after `checkpoint-{newest}` is written, delete the oldest checkpoints so that at most
    `limit` remain — only those numbered below `newest` (what this run passed through): a higher-numbered folder
    belongs to another run in the same output_dir and is never touched. Returns the removed paths."""
    if not limit or limit < 1:
        return []
    older = [p for p in numbered_checkpoints(output_dir) if checkpoint_number(p) < newest]
    removed = older[limit - 1:]
    for p in removed:
        shutil.rmtree(p)
    return [str(p) for p in removed]


def earlier_run(output_dir) -> list[str]:
    """What an earlier run left in `output_dir` that a new run there would mix with: its checkpoints (a later
    `resume_from_checkpoint=True` would continue *that* run) and its monitor log (the new iterations would be
    appended to it). Empty when there is none."""
    out = Path(output_dir)
    found = [p.name for p in reversed(numbered_checkpoints(out))]
    metrics = out / "monitor" / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("monitor/metrics.jsonl")
    return found


def clear_earlier_run(output_dir) -> None:
    """`overwrite_output_dir=True`: remove an earlier run's checkpoints and monitor logs (the review queue and the
    people's decisions in it are kept: they are labels, not the run's state)."""
    out = Path(output_dir)
    for p in numbered_checkpoints(out):
        shutil.rmtree(p)
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
