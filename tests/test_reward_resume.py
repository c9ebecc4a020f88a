"""RewardEnsembleTrainer's checkpoints and resuming: whole-folder atomic checkpoints whose manifest covers every file
(a torn trainer_state.json or optimizer.pt is skipped by resume=True and named), a new run refused in an output_dir
an earlier run used, a finished run resumed without training, and an explicit resume from an older checkpoint
superseding the abandoned timeline's later ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.integrity import (CorruptFileError, check_new_run, numbered_checkpoints, remove_oldest_checkpoints,
                                supersede_later_checkpoints)

from .conftest import preference_rows
from .test_ppo_resume import _notes


def _args(out, **kw):
    base = dict(max_steps=2, report_to="none", save_strategy="steps", save_steps=1, use_cpu=True, disable_tqdm=True,
                per_device_train_batch_size=8, normalization_samples=8, logging_steps=1, learning_rate=1e-2,
                lr_scheduler_type="constant", seed=0)
    return RewardEnsembleConfig(str(out), **{**base, **kw})


def _trainer(out, tiny_path, tok, rows=32, eval_rows=None, data_seed=0, **kw):
    return RewardEnsembleTrainer(tiny_path, args=_args(out, **kw),
                                 train_dataset=Dataset.from_list(preference_rows(rows, data_seed)),
                                 eval_dataset=Dataset.from_list(preference_rows(eval_rows, 1)) if eval_rows else None,
                                 processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))


def _weights(tr) -> dict:
    return {k: v.detach().clone() for k, v in tr.accelerator.unwrap_model(tr.model).state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _spy_steps(tr) -> list:
    steps, step = [], tr.training_step
    tr.training_step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    return steps


def _spy_loads(tr) -> list:
    loaded, load = [], tr._load_from_checkpoint
    tr._load_from_checkpoint = lambda path, *a, **k: (loaded.append(Path(path).name), load(path, *a, **k))[1]
    return loaded


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, tiny_path, tok):
    """A finished 2-step run with checkpoint-1 and checkpoint-2 (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("rm") / "run"
    tr = _trainer(out, tiny_path, tok)
    tr.train()
    return out, _weights(tr)


def _copy(two_steps, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(two_steps[0], out)
    return out


# -- 1. atomic, verified checkpoints ---------------------------------------------------------------------------
def test_the_manifest_covers_every_file_of_a_checkpoint(two_steps):
    """transformers wrote optimizer.pt, scheduler.pt, rng_state.pth and trainer_state.json into the folder after
    the artifact's manifest, unverified; no temporary folder is left behind."""
    out = two_steps[0]
    for n in (1, 2):
        listed = set(json.loads((out / f"checkpoint-{n}" / "manifest.json").read_text())["files"])
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "heads.safetensors"} <= listed
        on_disk = {p.relative_to(out / f"checkpoint-{n}").as_posix() for p in (out / f"checkpoint-{n}").rglob("*")
                   if p.is_file() and p.name != "manifest.json"}
        assert on_disk == listed
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("name,damage", [("trainer_state.json", "empty"), ("trainer_state.json", "half"),
                                         ("optimizer.pt", "half"), ("rng_state.pth", "half")])
def test_a_torn_checkpoint_file_falls_back_or_is_named(two_steps, tmp_path, tiny_path, tok, name, damage):
    """A kill inside transformers' save left an empty or half trainer_state.json (resume=True: a bare
    JSONDecodeError) or a truncated optimizer.pt (an OSError naming no file): resume=True now skips the checkpoint
    with a warning naming the file and continues from the one before; the damaged folder given explicitly is
    refused, naming the file."""
    out = _copy(two_steps, tmp_path)
    path = out / "checkpoint-2" / name
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    tr = _trainer(out, tiny_path, tok, max_steps=3)
    loaded = _spy_loads(tr)
    with pytest.warns(UserWarning, match=f"Skipping damaged checkpoint .*checkpoint-2: .*checkpoint-2/{name}: "
                                         f"truncated"):
        tr.train(resume_from_checkpoint=True)
    assert loaded == ["checkpoint-1"] and tr.state.global_step == 3
    shutil.rmtree(out)
    out = _copy(two_steps, tmp_path)
    (out / "checkpoint-2" / name).write_bytes(b"")
    with pytest.raises(CorruptFileError, match=f"checkpoint-2/{name}: truncated.*Resume from an earlier checkpoint"):
        _trainer(out, tiny_path, tok, max_steps=3).train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_a_save_killed_midway_leaves_no_checkpoint_folder(tmp_path, tiny_path, tok, monkeypatch):
    """A failure (as a kill) while transformers writes the RNG state of checkpoint-2: before, checkpoint-2 was there
    with the artifact and no trainer state; now it never appears (only checkpoint-2.tmp, which nothing reads), and
    resume=True continues from checkpoint-1."""
    from transformers import Trainer

    out, real = tmp_path / "run", Trainer._save_rng_state

    def killed(self, folder):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return real(self, folder)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed)
    with pytest.raises(KeyboardInterrupt):
        _trainer(out, tiny_path, tok, max_steps=3).train()
    monkeypatch.undo()
    assert [p.name for p in numbered_checkpoints(out)] == ["checkpoint-1"]
    tr = _trainer(out, tiny_path, tok, max_steps=3)
    loaded = _spy_loads(tr)
    tr.train(resume_from_checkpoint=True)
    assert loaded == ["checkpoint-1"] and tr.state.global_step == 3


def test_save_total_limit_and_the_best_checkpoint_are_kept(tmp_path, tiny_path, tok):
    """save_total_limit keeps the newest checkpoint and the best model's (transformers' rules; at the end of training
    transformers itself keeps the best alone when the limit is 1) and never touches a superseded folder (a
    `checkpoint-9.superseded` matched transformers' `checkpoint-*` clean-up); trainer_state.json names the best
    checkpoint by its final name, not the temporary one."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "superseded-checkpoint-9").mkdir()
    tr = _trainer(out, tiny_path, tok, eval_rows=8, max_steps=4, save_total_limit=1, eval_strategy="steps",
                  eval_steps=1, metric_for_best_model="eval_loss", greater_is_better=False)
    seen = []

    def pick(metrics, trial):  # step 2 is the best whatever the losses: the test does not depend on them
        seen.append(sorted(p.name for p in numbered_checkpoints(out)))
        if tr.state.global_step <= 2:
            tr.state.best_global_step, tr.state.best_metric = tr.state.global_step, metrics["eval_loss"]
            return True
        return False

    tr._determine_best_metric = pick
    tr.train()
    # before the saves of steps 2, 3, 4: checkpoint-1 went at step 2, checkpoint-3 at step 4 (the best one stays)
    assert seen == [[], ["checkpoint-1"], ["checkpoint-2"], ["checkpoint-2", "checkpoint-3"]]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "superseded-checkpoint-9"]
    assert tr.state.best_model_checkpoint == str(out / "checkpoint-2")
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == str(out / "checkpoint-2")


def test_remove_oldest_checkpoints_counts_only_numbered_folders_of_this_run(tmp_path):
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-9", "checkpoint-5.tmp",
                 "superseded-checkpoint-6"):
        (tmp_path / name).mkdir()
    removed = remove_oldest_checkpoints(tmp_path, 4, 2, keep=str(tmp_path / "checkpoint-1"))
    assert sorted(Path(p).name for p in removed) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-4", "checkpoint-5.tmp",
                                                          "checkpoint-9", "superseded-checkpoint-6"]


# -- 2. a new run in a used output_dir -----------------------------------------------------------------------------
def test_a_new_run_in_an_earlier_runs_output_dir_is_refused_unless_overwritten(two_steps, tmp_path, tiny_path, tok):
    """trl.RewardTrainer (and this trainer before) started it silently; killed, its resume=True then continued the
    earlier run's higher checkpoint. Refused as PPOTrainer refuses it, nothing touched; overwrite_output_dir=True
    removes the earlier checkpoints first."""
    out = _copy(two_steps, tmp_path)
    tr = _trainer(out, tiny_path, tok, max_steps=1)
    steps = _spy_steps(tr)
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint-1, checkpoint-2\).*"
                                         r"resume_from_checkpoint=True.*another output_dir.*overwrite_output_dir=True"):
        tr.train()
    assert steps == [] and [p.name for p in numbered_checkpoints(out)] == ["checkpoint-2", "checkpoint-1"]
    _trainer(out, tiny_path, tok, max_steps=3).train(resume_from_checkpoint=True)  # resuming it is fine
    fresh = _trainer(out, tiny_path, tok, max_steps=1, overwrite_output_dir=True)
    fresh.train()
    assert [p.name for p in numbered_checkpoints(out)] == ["checkpoint-1"]
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["max_steps"] == 1  # the new run's


def test_overwrite_output_dir_is_a_config_field():
    assert RewardEnsembleConfig("x", use_cpu=True).overwrite_output_dir is False
    assert RewardEnsembleConfig("x", use_cpu=True, overwrite_output_dir=True).overwrite_output_dir is True


def test_check_new_run(tmp_path):
    assert check_new_run(tmp_path, [], False) is False
    assert check_new_run(tmp_path, ["checkpoint-1"], True) is True
    with pytest.raises(ValueError, match="holds an earlier run"):
        check_new_run(tmp_path, ["checkpoint-1"], False)


# -- 3. resuming a finished run ------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", ["max_steps", "epochs"])
def test_resuming_a_finished_run_trains_nothing(two_steps, tmp_path, tiny_path, tok, capsys, length):
    """transformers trained one step past max_steps and changed the weights; now the checkpoint is loaded and
    nothing is trained (as PPOTrainer), with a message. 32 pairs in batches of 8 for 0.5 epochs is the same 2 steps."""
    out = _copy(two_steps, tmp_path)
    kw = {"max_steps": 2} if length == "max_steps" else {"max_steps": -1, "num_train_epochs": 0.5}
    tr = _trainer(out, tiny_path, tok, **kw)
    steps = _spy_steps(tr)
    result = tr.train(resume_from_checkpoint=True)
    assert steps == [] and tr.state.global_step == result.global_step == 2
    assert _same(_weights(tr), two_steps[1])
    assert "Nothing to train: " in capsys.readouterr().err and tr.normalization is not None
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]


# -- 4. an explicit resume from an older checkpoint --------------------------------------------------------------
def test_resuming_an_older_checkpoint_supersedes_the_later_ones(tmp_path, tiny_path, tok):
    """Run A wrote checkpoint-1..4; going back to checkpoint-2 (timeline B) left A's checkpoint-4, which
    resume=True then took. Now checkpoint-3 and -4 are renamed (kept), and resume=True continues timeline B."""
    out = tmp_path / "run"
    _trainer(out, tiny_path, tok, max_steps=4).train()
    b = _trainer(out, tiny_path, tok, max_steps=3, data_seed=5)  # other pairs: timeline B's step 3 differs from A's
    with pytest.warns(UserWarning, match=r"Resuming from checkpoint-2 .*checkpoint-3, checkpoint-4 came after it.*"
                                         r"superseded-checkpoint-3, superseded-checkpoint-4"):
        b.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3", "superseded-checkpoint-3", "superseded-checkpoint-4"]
    later = _trainer(out, tiny_path, tok, max_steps=4, data_seed=5)
    loaded = _spy_loads(later)
    later.train(resume_from_checkpoint=True)
    assert loaded == ["checkpoint-3"] and later.state.global_step == 4
    b_loss = [h["loss"] for h in b.state.log_history if "loss" in h][-1]
    a_loss = [h["loss"] for h in json.loads((out / "superseded-checkpoint-3" / "trainer_state.json").read_text())[
        "log_history"] if "loss" in h][-1]
    assert [h["loss"] for h in later.state.log_history if "loss" in h][2] == b_loss != a_loss  # timeline B's step 3


def test_supersede_later_checkpoints(tmp_path):
    out = tmp_path / "out"
    for n in (1, 2, 3, 10):
        (out / f"checkpoint-{n}").mkdir(parents=True)
    (out / "superseded-checkpoint-3").mkdir()  # an earlier abandoned timeline took the name
    assert supersede_later_checkpoints(out, tmp_path / "elsewhere" / "checkpoint-1") == []  # not this output_dir
    with pytest.warns(UserWarning, match="checkpoint-3, checkpoint-10 came after it"):
        moved = supersede_later_checkpoints(out, out / "checkpoint-2")
    assert [p.name for p in moved] == ["superseded-checkpoint-3.2", "superseded-checkpoint-10"]
    assert [p.name for p in numbered_checkpoints(out)] == ["checkpoint-2", "checkpoint-1"]
    assert supersede_later_checkpoints(out, out / "checkpoint-2") == []  # the newest: nothing later


# -- under DDP -------------------------------------------------------------------------------------------------
DDP_WORKER = '''
import json, os, sys
import torch
torch.set_num_threads(1)
from datasets import Dataset
from peft import LoraConfig
from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.testing import tiny_tokenizer
from tests.conftest import preference_rows

out, base = sys.argv[1], sys.argv[2]
tok = tiny_tokenizer()


def trainer(steps):
    args = RewardEnsembleConfig(out + "/run", max_steps=steps, report_to="none", save_strategy="steps", save_steps=1,
                                use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4,
                                normalization_samples=8, logging_steps=1, seed=0)
    return RewardEnsembleTrainer(base, args=args, train_dataset=Dataset.from_list(preference_rows(32, 0)),
                                 processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))


a = trainer(3)
a.train()
b = trainer(2)
b.train(resume_from_checkpoint=out + "/run/checkpoint-1")
c = trainer(3)
c.train(resume_from_checkpoint=True)
rank = c.accelerator.process_index
json.dump({"steps": [a.state.global_step, b.state.global_step, c.state.global_step]},
          open(f"{out}/rank{rank}.json", "w"))
'''


def test_checkpoints_and_resuming_under_ddp(tmp_path, tiny_path):
    """Two processes (gloo): each writes its RNG state into the one temporary folder, which the main process
    finishes (the manifest lists both); an explicit resume from an older checkpoint supersedes the later ones once;
    resume=True then continues the new timeline on both ranks."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(root / "recipes/accelerate_configs/cpu_2proc.yaml"), "--main_process_port", "29690",
           str(tmp_path / "worker.py"), str(tmp_path), tiny_path]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert [json.loads((tmp_path / f"rank{i}.json").read_text())["steps"] for i in (0, 1)] == [[3, 2, 3]] * 2
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3", "superseded-checkpoint-2", "superseded-checkpoint-3"]
    for folder in ("checkpoint-3", "superseded-checkpoint-3"):
        listed = json.loads((run / folder / "manifest.json").read_text())["files"]
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= set(listed)
    assert r.stderr.count("came after it") == 1  # renamed by the main process alone


@pytest.mark.parametrize("signum, raised", [("SIGINT", KeyboardInterrupt), ("SIGTERM", SystemExit)])
def test_a_signal_mid_step_saves_that_step_and_resumes_to_the_same_weights(tmp_path, tiny_path, tok, capsys, signum,
                                                                           raised):
    """Ctrl-C or `kill` during reward training (save_strategy 'no'): the process died at once and every step since
    the last checkpoint — here all of them — was lost (SIGTERM: status -15, nothing said). Now the step under way
    ends, is saved as checkpoint-2, the run stops as the signal means and says how to resume; resumed, it ends at the
    uninterrupted run's weights exactly."""
    import os
    import signal

    from transformers import TrainerCallback

    class SignalDuringStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), getattr(signal, signum))

    tr = _trainer(tmp_path / "cut", tiny_path, tok, max_steps=4, save_strategy="no")
    tr.add_callback(SignalDuringStep2())
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(raised) as stop:
            tr.train()
    finally:
        signal.signal(signal.SIGINT, found)
    if raised is SystemExit:
        assert stop.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-2"]
    err = capsys.readouterr().err
    assert f"{signum}: stopping after this step" in err and "Stopped after step 2: checkpoint-2" in err
    resumed = _trainer(tmp_path / "cut", tiny_path, tok, max_steps=4, save_strategy="no")
    steps = _spy_steps(resumed)
    resumed.train(resume_from_checkpoint=True)
    whole = _trainer(tmp_path / "whole", tiny_path, tok, max_steps=4, save_strategy="no")
    whole.train()
    assert len(steps) == 2 and _same(_weights(resumed), _weights(whole))


# -- 5. a resume with another number of pairs per optimizer step ----------------------------------------------------
def test_a_resume_with_another_global_batch_is_refused_naming_the_settings_that_keep_it(two_steps, tmp_path, tiny_path,
                                                                                        tok):
    """transformers skips `global_step` batches of the resumed run's size: checkpoint-1 of 8 pairs a step resumed
    with 4 (half the per-device batch, or twice the processes for the same per-device batch under DDP: the
    2-process case was measured through the recipes) trained pairs 4-7 again, silently. Refused, naming the
    settings that keep 8 pairs a step; the same 8 pairs a step reached otherwise (accumulation) resumes, as does
    ignore_data_skip=True, which asks for no skip."""
    out = _copy(two_steps, tmp_path)
    with pytest.raises(ValueError, match=r"trained 8 pairs per optimizer step .* this run takes 4 .* trained again.*"
                                         r"per_device_train_batch_size=8"):
        _trainer(out, tiny_path, tok, per_device_train_batch_size=4).train(
            resume_from_checkpoint=str(out / "checkpoint-1"))
    tr = _trainer(out, tiny_path, tok, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    steps = _spy_steps(tr)
    tr.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert tr.state.global_step == 2 and len(steps) == 2  # one optimizer step of two micro-batches
    out = _copy(two_steps, tmp_path / "again")
    _trainer(out, tiny_path, tok, per_device_train_batch_size=4, ignore_data_skip=True).train(
        resume_from_checkpoint=str(out / "checkpoint-1"))


def test_a_refused_resume_changes_nothing_in_output_dir(two_steps, tmp_path, tiny_path, tok):
    """An explicit resume from checkpoint-1 with another number of pairs per step is refused — before checkpoint-2 is
    renamed superseded-checkpoint-2 (it was, so the corrected resume=True continued checkpoint-1)."""
    out = _copy(two_steps, tmp_path)
    with pytest.raises(ValueError, match="pairs per optimizer step"):
        _trainer(out, tiny_path, tok, per_device_train_batch_size=4).train(
            resume_from_checkpoint=str(out / "checkpoint-1"))
    assert sorted(p.name for p in numbered_checkpoints(out)) == ["checkpoint-1", "checkpoint-2"]
    assert not list(out.glob("superseded-*"))


def test_auto_find_batch_size_is_checked_by_the_batch_that_trained(tmp_path, tiny_path, tok):
    """auto_find_batch_size shrank 8 to 7 after an out-of-memory error: training_args.json still says 8, transformers
    records 7 (trainer_state.json's train_batch_size) and, with auto_find_batch_size on, resumes by 7 whatever the
    configured size. Resumed with 8 and it off: 8 pairs skipped where 7 trained — refused, naming 7; with it on and
    16 configured: resumes (it was refused)."""
    out = tmp_path / "run"
    tr = _trainer(out, tiny_path, tok, max_steps=3, auto_find_batch_size=True)
    step, calls = tr.training_step, []

    def out_of_memory(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory.")
        return step(*a, **k)

    tr.training_step = out_of_memory
    tr.train()
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["train_batch_size"] == 7
    with pytest.raises(ValueError, match=r"trained 7 pairs .*\(per_device_train_batch_size=7"):
        _trainer(out, tiny_path, tok, max_steps=3).train(resume_from_checkpoint=str(out / "checkpoint-1"))
    again = _trainer(out, tiny_path, tok, max_steps=3, per_device_train_batch_size=16, auto_find_batch_size=True)
    steps = _spy_steps(again)
    again.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert len(steps) == 2


# -- 6. an exception mid-run: the optimizer steps that finished are saved -----------------------------------------------
class _FailOnce(TrainerCallback):
    """Raises once at `event` when `global_step == at`."""

    def __init__(self, event: str, at: int, error: Exception):
        self.at, self.error, self.done = at, error, False
        setattr(self, event, self._maybe)

    def _maybe(self, args, state, control, **kwargs):
        if state.global_step == self.at and not self.done:
            self.done = True
            raise self.error


@pytest.mark.parametrize("where", ["in step 3", "after step 3"])
def test_a_failure_saves_the_finished_steps_and_the_resumed_run_ends_as_the_whole_one(tmp_path, tiny_path, tok,
                                                                                       where):
    """Out of memory in the second micro-batch of step 3 (the first one's gradient already accumulated), or an
    evaluation failing after step 3 (its on_step_end here), with save_strategy "no": transformers saved nothing on
    its way out, and every step was lost. The steps that finished are saved — the failed step dropped —, the
    exception names the folder, and the resumed run ends with the weights of the run that never failed."""
    run = dict(max_steps=4, save_strategy="no", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    tr = _trainer(tmp_path / "cut", tiny_path, tok, **run)
    if where == "in step 3":
        calls, loss = [], tr.compute_loss

        def compute_loss(*a, **k):
            calls.append(tr.state.global_step)
            if calls.count(2) == 2:
                raise torch.OutOfMemoryError("out of memory")
            return loss(*a, **k)

        tr.compute_loss, error, saved, after = compute_loss, torch.OutOfMemoryError, 2, "the failed step is dropped"
    else:
        tr.add_callback(_FailOnce("on_step_end", 3, RuntimeError("the evaluation server is down")))
        error, saved, after = RuntimeError, 3, "this error came after it"
    with pytest.raises(error) as e:
        tr.train()
    folder = tmp_path / "cut" / f"checkpoint-{saved}"
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == [folder.name]
    assert f"{folder} holds the {saved} optimizer step(s) that finished ({after}" in _notes(e)
    resumed = _trainer(tmp_path / "cut", tiny_path, tok, **run)
    steps = _spy_steps(resumed)
    resumed.train(resume_from_checkpoint=True)
    whole = _trainer(tmp_path / "whole", tiny_path, tok, **run)
    whole.train()
    assert len(steps) == 2 * (4 - saved) and _same(_weights(resumed), _weights(whole))


def test_a_failure_inside_the_optimizer_step_saves_nothing_and_names_the_newest_checkpoint(tmp_path, tiny_path, tok):
    """After optimizer.step() the weights have moved and the step is not counted yet: no consistent checkpoint can
    be written; the exception names the newest one there is."""
    tr = _trainer(tmp_path / "cut", tiny_path, tok, max_steps=4, save_steps=1)
    tr.add_callback(_FailOnce("on_optimizer_step", 2, RuntimeError("a callback bug")))
    with pytest.raises(RuntimeError) as e:
        tr.train()
    assert "optimizer step 3 failed while the weights were being updated" in _notes(e)
    assert f"the newest checkpoint is {tmp_path / 'cut' / 'checkpoint-2'}" in _notes(e)
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_a_failure_after_an_evaluation_resumes_bit_for_bit(tmp_path, tiny_path, tok):
    """An evaluation draws from torch's random stream (its DataLoader's seed) after on_step_end, and transformers'
    own checkpoint is written after it: the streams saved after a failure in the next step were the ones from before
    the evaluation, so with dropout the resumed run drifted from the run that never failed."""
    run = dict(max_steps=5, save_strategy="no", per_device_train_batch_size=4, eval_strategy="steps", eval_steps=1,
               disable_dropout=False)
    peft = LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1)

    def build(out):
        return RewardEnsembleTrainer(tiny_path, args=_args(out, **run), processing_class=tok, peft_config=peft,
                                     train_dataset=Dataset.from_list(preference_rows(32, 0)),
                                     eval_dataset=Dataset.from_list(preference_rows(8, 1)))

    tr, loss = build(tmp_path / "cut"), None
    loss = tr.compute_loss

    def compute_loss(model, inputs, *a, **k):
        if tr.model.training and tr.state.global_step == 3:
            raise torch.OutOfMemoryError("out of memory")
        return loss(model, inputs, *a, **k)

    tr.compute_loss = compute_loss
    with pytest.raises(torch.OutOfMemoryError):
        tr.train()
    resumed = build(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=True)
    whole = build(tmp_path / "whole")
    whole.train()
    assert _same(_weights(resumed), _weights(whole))


def test_a_failure_in_the_closing_normalisation_saves_the_run(tmp_path, tiny_path, tok, monkeypatch):
    """compute_normalization runs after super().train(), outside the save-on-failure: out of memory there lost the
    whole run (save_strategy "no"). Now checkpoint-N is saved and a resume loads it and trains nothing."""
    tr = _trainer(tmp_path / "cut", tiny_path, tok, max_steps=3, save_strategy="no")
    compute, calls = tr.compute_normalization, []

    def once(*a, **k):  # the checkpoint's own normalisation (the artifact's) passes: the memory was freed
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("out of memory")
        return compute(*a, **k)

    monkeypatch.setattr(tr, "compute_normalization", once)
    with pytest.raises(torch.OutOfMemoryError) as e:
        tr.train()
    assert f"{tmp_path / 'cut' / 'checkpoint-3'} holds the 3 optimizer step(s)" in _notes(e)
    resumed = _trainer(tmp_path / "cut", tiny_path, tok, max_steps=3, save_strategy="no")
    steps = _spy_steps(resumed)
    resumed.train(resume_from_checkpoint=True)
    assert steps == [] and resumed.normalization is not None


def test_a_failing_on_pre_optimizer_step_callback_saves_the_finished_steps(tmp_path, tiny_path, tok):
    """on_pre_optimizer_step comes before optimizer.step(): the weights have not moved, so the finished steps are
    saved (they were refused as "failed while the weights were being updated")."""
    tr = _trainer(tmp_path / "cut", tiny_path, tok, max_steps=4, save_strategy="no")
    tr.add_callback(_FailOnce("on_pre_optimizer_step", 2, RuntimeError("a gradient check")))
    with pytest.raises(RuntimeError) as e:
        tr.train()
    assert "checkpoint-2 holds the 2 optimizer step(s) that finished (the failed step is dropped" in _notes(e)


def test_no_step_is_saved_with_the_best_models_weights(tmp_path, tiny_path, tok):
    """load_best_model_at_end with save_strategy "best": the last step has no checkpoint, and on_train_end comes after
    the best model is loaded; saving then wrote checkpoint-N with the best step's weights beside step N's optimizer,
    scheduler and trainer state."""
    tr = _trainer(tmp_path / "cut", tiny_path, tok, eval_rows=8, max_steps=5, per_device_train_batch_size=4,
                  eval_strategy="steps", eval_steps=2, save_strategy="best", load_best_model_at_end=True,
                  metric_for_best_model="eval_loss", greater_is_better=True)
    tr.add_callback(_FailOnce("on_train_end", 5, RuntimeError("a tracker upload")))
    with pytest.raises(RuntimeError) as e:
        tr.train()
    assert "model holds the best checkpoint's weights" in _notes(e)
    assert not (tmp_path / "cut" / "checkpoint-5").exists()


def test_a_reward_checkpoint_of_rlhf_ext_0_1_is_refused_naming_init_reward_model(two_steps, tmp_path, tiny_path, tok):
    """A format-1 spec (0.1 recorded no base fingerprint) was refused for "base_fingerprint = None", a setting no
    user can match; 0.1's training is not continued step for step, so its weights are the way on."""
    out = _copy(two_steps, tmp_path)
    spec = out / "checkpoint-1" / "rlhf_ext_reward.json"
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "format_version": 1}))
    (out / "checkpoint-1" / "manifest.json").unlink()  # 0.1 wrote none
    with pytest.raises(ValueError, match=r"written by rlhf_ext 0\.1 .* init_reward_model="):
        _trainer(out, tiny_path, tok).train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert (out / "checkpoint-2").is_dir()  # refused before the later checkpoints were superseded


def test_a_resumed_run_failing_before_its_first_step_names_the_checkpoint_that_stands(tmp_path, tiny_path, tok):
    """A resume whose first step fails again (the same out-of-memory, a reward server still down) ended with no
    note at all, where a failure one step later named the checkpoint to resume from."""
    _trainer(tmp_path / "cut", tiny_path, tok, max_steps=2, save_strategy="steps", save_steps=2).train()
    resumed = _trainer(tmp_path / "cut", tiny_path, tok, max_steps=4, save_strategy="no")
    resumed.add_callback(_FailOnce("on_step_begin", 2, RuntimeError("out of memory")))
    with pytest.raises(RuntimeError) as e:
        resumed.train(resume_from_checkpoint=True)
    assert f"{tmp_path / 'cut' / 'checkpoint-2'} holds the 2 optimizer step(s) that finished (this run failed " \
           f"before it finished a step of its own)" in _notes(e)
