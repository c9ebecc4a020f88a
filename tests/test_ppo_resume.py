"""Resuming PPO with other settings than the checkpoint's: what the resume warning promises ("training continues with
the new values") must be what happens, and the state the checkpoint holds goes back where it belongs — the learning
rate and the KL target as configured now, a controller's β only into a controller of its kind, the reward pipeline's
running statistics by name. (The 2-process resume: tests/test_data_parallel.py.)"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from transformers import TrainerCallback

from rlhf_ext import RewardPipeline
from rlhf_ext.testing import tiny_causal_lm

from .test_ppo import _params, make

# The run every resume below starts from: 4 iterations straight, checkpoint-2 kept. A linear schedule (the rate
# moves every step) and weight decay (two parameter groups), under the hard KL controller (its guard is built from
# kl_target at start-up)
RUN = dict(max_steps=4, learning_rate=1e-2, lr_scheduler_type="linear", weight_decay=0.1, kl_controller="hard",
           kl_target=0.5, init_kl_coef=0.05, shapers=[{"name": "debias"}], per_device_train_batch_size=8,
           max_completion_length=24)  # long enough for some responses to end early: debias needs lengths that vary


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("straight")
    tr = make(out, tok, save_strategy="steps", save_steps=2, **RUN)
    hist = tr.train()
    return out / "ppo" / "checkpoint-2", hist, _params(tr)


def _resume(tmp_path, tok, ckpt, callbacks=None, **changes):
    """The straight run's checkpoint-2 resumed with `changes`, in another output_dir; (trainer, history, warnings)."""
    tr = make(tmp_path, tok, callbacks=callbacks, **{**RUN, **changes})
    for c in callbacks or []:
        c.trainer = tr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = tr.train(resume_from_checkpoint=str(ckpt))
    return tr, hist, [str(w.message) for w in caught]


class Rates(TrainerCallback):
    """The optimizer's rates and the schedule's step when training begins (just after the load) and after each
    iteration."""

    def __init__(self):
        self.trainer, self.seen = None, []

    def _look(self):
        opt, sched = self.trainer.optimizer, self.trainer.lr_scheduler
        self.seen.append((sched.last_epoch, [g["lr"] for g in opt.param_groups], sched.get_last_lr()))

    def on_train_begin(self, args, state, control, **kw):
        self._look()

    def on_step_end(self, args, state, control, **kw):
        self._look()


def _resume_warning(said: list[str]) -> str:
    return next((m for m in said if m.startswith("Resuming from")), "")


def test_the_same_settings_continue_the_run_exactly(straight, tmp_path, tok):
    ckpt, hist, params = straight
    torch.manual_seed(123)  # another process state: the checkpoint restores what sampling depends on
    tr, resumed, said = _resume(tmp_path, tok, ckpt)
    assert not _resume_warning(said) and not [m for m in said if "Reward pipeline" in m or "KL controller" in m]
    assert [h["loss/policy"] for h in resumed] == [h["loss/policy"] for h in hist]  # bit for bit
    assert [h["learning_rate"] for h in resumed] == [h["learning_rate"] for h in hist]
    now = _params(tr)
    assert all(torch.equal(now[k], params[k]) for k in params)


def test_a_new_learning_rate_and_kl_target_are_the_ones_trained_with(straight, tmp_path, tok):
    """The warning says training continues with the new values: the optimizer steps with the new learning rate at
    the schedule's saved position (before, the checkpoint's optimizer and scheduler put the old rate back), and the
    KL controller and the hard-KL guard both hold the new target (before, the controller took the checkpoint's back
    while the guard, built at start-up, had the new one)."""
    ckpt, hist, _ = straight
    rates = Rates()
    tr, resumed, said = _resume(tmp_path, tok, ckpt, callbacks=[rates], learning_rate=3e-2, kl_target=4.0)
    assert "learning_rate: 0.01 in the checkpoint, 0.03 now; kl_target: 0.5 in the checkpoint, 4.0 now" in \
        _resume_warning(said)
    # where the schedule stood at the checkpoint, at 3x the rate; then every step at 3e-2 x the schedule's factor
    # (how many steps an iteration takes depends on the guard, so the straight run's later rates do not compare)
    step, groups, last = rates.seen[0]
    assert groups == last == pytest.approx([3 * hist[1]["learning_rate"]] * 2, rel=1e-12) and 0 < groups[0] < 3e-2
    factor = tr.lr_scheduler.lr_lambdas[0]
    for step, groups, last in rates.seen:
        assert groups == last == pytest.approx([3e-2 * factor(step)] * 2, rel=1e-12), step
    assert [h["learning_rate"] for h in resumed[2:]] == [last[0] for _, _, last in rates.seen[1:]]
    assert tr.lr_scheduler.base_lrs == [3e-2, 3e-2]
    assert tr.kl_ctl.target == tr.kl_guard.delta == 4.0
    # the controller's own state (β, its integral) is the checkpoint's: iteration 3 used the straight run's β
    assert resumed[2]["objective/beta"] == hist[2]["objective/beta"]


def test_a_changed_kl_controller_does_not_load_anothers_state(straight, tmp_path, tok):
    """A hard (Lagrangian) controller's multiplier is not an adaptive controller's β: resumed with
    kl_controller='adaptive', β starts at init_kl_coef, said in a warning."""
    ckpt, hist, _ = straight
    assert hist[2]["objective/beta"] != RUN["init_kl_coef"]  # the checkpoint's β had moved
    tr, resumed, said = _resume(tmp_path, tok, ckpt, kl_controller="adaptive")
    assert "kl_controller: 'hard' in the checkpoint, 'adaptive' now" in _resume_warning(said)
    assert any("saved by a 'hard' controller was not loaded into this 'adaptive' one" in m for m in said)
    assert resumed[2]["objective/beta"] == RUN["init_kl_coef"]
    assert tr.kl_ctl.target == RUN["kl_target"] and not hasattr(tr.kl_ctl, "integral")


def test_another_seed_or_base_model_is_named_by_the_resume_warning(straight, tmp_path, tok):
    ckpt, _, _ = straight
    _, _, said = _resume(tmp_path / "seed", tok, ckpt, seed=7, data_seed=3)
    assert "seed: 0 in the checkpoint, 7 now; data_seed: None in the checkpoint, 3 now" in _resume_warning(said)
    _, _, said = _resume(tmp_path / "model", tok, ckpt, model=tiny_causal_lm(tok, seed=1))
    warning = _resume_warning(said)
    assert "base_model_fingerprint: " in warning and "trained on another base model" in warning
    assert "seed" not in warning


def test_changed_reward_shapers_and_functions_take_their_state_by_name(straight, tmp_path, tok):
    """Resumed with a length shaper put before debias (by position, debias's slope went into it and debias started
    over), and with another reward function (the documented retrain-and-resume flow): debias gets its own state back
    and the run goes on; nothing of the pipeline's is lost, so nothing is warned about."""
    ckpt, _, _ = straight
    saved = json.loads((ckpt / "ppo_state.json").read_text())["rewards"]
    assert saved["shapers"]["debias"]["slope"] is not None

    def other_reward(completion_ids, **kw):
        return [float(len(c)) for c in completion_ids]

    restored = {}

    class Peek(TrainerCallback):  # the pipeline's state right after the load, before iteration 3 moves it
        def on_train_begin(self, args, state, control, **kw):
            restored["debias"] = tr.rewards.shapers[1].state_dict()

    tr = make(tmp_path, tok, reward=other_reward, callbacks=[Peek()],
              **{**RUN, "shapers": [{"name": "linear"}, {"name": "debias"}]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = tr.train(resume_from_checkpoint=str(ckpt))
    assert restored["debias"] == saved["shapers"]["debias"]
    assert not [w for w in caught if "Reward pipeline" in str(w.message)]
    assert len(hist) == 4 and all(math.isfinite(h["loss/policy"]) for h in hist)


# ------------------------------------------------------------------------------------- RewardPipeline state by name
def _lengths(completion_ids, **kw):
    return [float(len(c)) for c in completion_ids]


def _parity(completion_ids, **kw):
    return [float(len(c) % 2) for c in completion_ids]


def _first(completion_ids, **kw):
    return [float(c[0]) for c in completion_ids]


def _scored(members, shapers):
    """A pipeline that has scored two batches: its running normalisation and debias slope have moved."""
    p = RewardPipeline(members, shapers=[{"name": s} for s in shapers])
    for n in (3, 5):
        ids = [[7] * (1 + (i * n) % 6) for i in range(8)]
        p.score(None, ["x"] * len(ids), ids)
    return p


def _by_name(p):
    return {m.names[0]: m.state_dict() for m in p.members}, {s.name: s.state_dict() for s in p.shapers}


def test_pipeline_state_goes_to_the_member_or_shaper_of_its_name():
    """Members reordered and a shaper added in front: each takes its own state (by position, the debias state went
    into the linear shaper and the members' statistics were swapped). Through JSON, as a checkpoint stores it."""
    old = _scored([_lengths, _parity], ["debias"])
    new = RewardPipeline([_parity, _lengths], shapers=[{"name": "linear"}, {"name": "debias"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything matched: nothing to say
        new.load_state_dict(json.loads(json.dumps(old.state_dict())))
    (old_members, old_shapers), (members, shapers) = _by_name(old), _by_name(new)
    assert members == old_members and old_members["_lengths"] != old_members["_parity"]
    assert shapers["debias"] == old_shapers["debias"] and shapers["debias"]["slope"] is not None


def test_pipeline_state_without_a_match_is_named():
    old = _scored([_lengths, _parity], ["debias"])
    new = RewardPipeline([_lengths, _first])  # _parity and debias gone, _first new
    with pytest.warns(UserWarning, match=r"not restored \(not in this pipeline\): member '_parity', shaper 'debias'; "
                                         r"starting from scratch \(none saved under that name\): member '_first'"):
        new.load_state_dict(old.state_dict())
    assert new.members[0].state_dict() == old.members[0].state_dict()
    assert new.members[1].count == 0


def test_pipeline_loads_an_older_checkpoints_lists():
    """Checkpoints written before states were keyed by name hold lists in pipeline order: taken by position when the
    pipeline has as many members / shapers, and a state only where its keys fit the part at its position."""
    old = _scored([_lengths, _parity], ["debias"])
    lists = {"shapers": [s.state_dict() for s in old.shapers], "members": [m.state_dict() for m in old.members]}
    same = RewardPipeline([_lengths, _parity], shapers=[{"name": "debias"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(lists)
    assert _by_name(same) == _by_name(old)
    other = RewardPipeline([_lengths, _parity], shapers=[{"name": "linear"}])  # same count, the state does not fit
    with pytest.warns(UserWarning, match=r"not restored .*shaper '#1 of 1 in an older checkpoint'"):
        other.load_state_dict(lists)


def test_resuming_an_older_checkpoint_supersedes_the_later_ones(tmp_path, tok):
    """Going back to checkpoint-2 of a 4-iteration run: the old timeline's checkpoint-3 and -4 are renamed (kept), so
    a later resume_from_checkpoint=True continues the new timeline, not the one left behind."""
    small = dict(max_completion_length=6, per_device_train_batch_size=8, save_strategy="steps", save_steps=1)
    make(tmp_path, tok, max_steps=4, **small).train()
    out = tmp_path / "ppo"
    with pytest.warns(UserWarning, match="superseded-checkpoint-3.*superseded-checkpoint-4|superseded"):
        make(tmp_path, tok, max_steps=3, **small).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3", "superseded-checkpoint-3", "superseded-checkpoint-4"]
    again = make(tmp_path, tok, max_steps=3, **small)
    again.train(resume_from_checkpoint=True)  # the new timeline's checkpoint-3: finished, nothing to train
    assert again.iteration == 3


def test_a_checkpoint_whose_schedule_counted_optimizer_steps_resumes_at_its_iteration(straight, tmp_path, tok):
    """Checkpoints from before the schedule counted iterations hold the scheduler at iterations × epochs ×
    minibatches steps: resumed, the schedule continues at the checkpoint's iteration, as the straight run did."""
    import shutil

    from rlhf_ext.integrity import write_manifest

    ckpt, hist, _ = straight
    old = tmp_path / "old-checkpoint-2"
    shutil.copytree(ckpt, old)
    state = json.loads((old / "ppo_state.json").read_text())
    del state["lr_schedule_unit"]
    (old / "ppo_state.json").write_text(json.dumps(state))
    opt = torch.load(old / "optimizer.pt", weights_only=True)
    opt["scheduler"]["last_epoch"] = 2 * 4  # 2 iterations × 4 epochs × 1 minibatch, as that code stepped it
    opt["scheduler"]["_last_lr"] = [1e-2 * (1 - 8 / 16)] * 2
    torch.save(opt, old / "optimizer.pt")
    (old / "manifest.json").unlink()
    write_manifest(old)
    tr, resumed, _ = _resume(tmp_path, tok, old)
    assert [h["learning_rate"] for h in resumed] == pytest.approx([h["learning_rate"] for h in hist], rel=1e-12)


def test_a_finished_checkpoint_trains_nothing_and_keeps_the_later_ones(tmp_path, tok, capsys):
    """Resumed with a run length the checkpoint has already reached: it says so, trains nothing, and leaves the
    later checkpoints as they are (they were renamed `superseded-…` although nothing replaced them)."""
    small = dict(max_completion_length=6, per_device_train_batch_size=8, save_strategy="steps", save_steps=1)
    make(tmp_path, tok, max_steps=4, **small).train()
    out = tmp_path / "ppo"
    tr = make(tmp_path, tok, max_steps=2, **small)
    tr.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert tr.iteration == 3
    assert "Nothing to train: " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_another_train_dataset_is_named_by_the_resume_warning(straight, tmp_path, tok):
    from .test_ppo import prompts

    ckpt, _, _ = straight
    _, _, said = _resume(tmp_path, tok, ckpt, data=prompts(16))
    warning = _resume_warning(said)
    assert "prompts: '32 prompts, sha256 " in warning and "'16 prompts, sha256 " in warning
    assert "another train_dataset" in warning
    _, _, said = _resume(tmp_path / "same", tok, ckpt)
    assert not _resume_warning(said)


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_a_checkpoint_holds_each_iteration_once_and_a_resume_returns_the_whole_history(tmp_path, tok, logging_steps):
    """ppo_state.json held every iteration's metrics beside trainer_state.json's log history: each checkpoint grew by
    twice the run's history (53 MB at 20k iterations), the disk by its square without save_total_limit. Now the log
    history holds what was logged and ppo_state.json only the iterations it does not."""
    run = dict(max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
               logging_steps=logging_steps)
    hist = make(tmp_path / "straight", tok, **run).train()
    for it in (2, 4):
        ckpt = tmp_path / "straight" / "ppo" / f"checkpoint-{it}"
        state = json.loads((ckpt / "ppo_state.json").read_text())
        logged = [e["step"] for e in json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
                  if "loss/policy" in e]
        unlogged = [i for i, _ in state["metrics_unlogged"]]
        assert "metrics" not in state and sorted(logged + unlogged) == list(range(1, it + 1))
        assert logged == list(range(logging_steps, it + 1, logging_steps))
    resumed = make(tmp_path / "resumed", tok, **run).train(
        resume_from_checkpoint=str(tmp_path / "straight" / "ppo" / "checkpoint-2"))
    assert resumed[:2] == hist[:2]  # the iterations before the resume, as the checkpoint holds them
    assert [h["loss/policy"] for h in resumed] == [h["loss/policy"] for h in hist] and len(resumed) == 4
    assert resumed.training_loss == pytest.approx(hist.training_loss)


def _resumed_pair(tmp_path, tok, straight_kw, checkpoint, resumed_kw=None, **kw):
    straight = make(tmp_path / "straight", tok, **{**kw, **straight_kw})
    hist = straight.train()
    resumed = make(tmp_path / "resumed", tok, **{**kw, **(resumed_kw or straight_kw)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "ppo" / checkpoint))
    return (straight, hist), (resumed, again), [str(w.message) for w in caught]


def test_a_plateau_schedule_keeps_its_reductions_across_a_resume(tmp_path, tok):
    """ReduceLROnPlateau has no base rates: the resume took its reduced rate for the configured one and put the
    configured rate back, undoing every reduction (transformers' Trainer keeps them)."""
    from .test_ppo import prompts

    run = dict(max_steps=4, per_device_train_batch_size=8, save_strategy="steps", save_steps=1, eval_strategy="steps",
               eval_steps=1, metric_for_best_model="kl", greater_is_better=False, logging_steps=1,
               lr_scheduler_type="reduce_lr_on_plateau", lr_scheduler_kwargs={"patience": 0, "factor": 0.5})
    (straight, hist), (resumed, again), _ = _resumed_pair(tmp_path, tok, {}, "checkpoint-2", eval_dataset=prompts(),
                                                          **run)
    rates = [h["learning_rate"] for h in hist]
    assert rates[2] < rates[0]  # the schedule reduced the rate before the checkpoint (a test that can fail)
    assert [h["learning_rate"] for h in again] == rates
    assert all(torch.equal(a, b) for a, b in zip(_params(straight).values(), _params(resumed).values()))


def test_numpy_draws_continue_across_a_resume(tmp_path, tok):
    """A reward function drawing from NumPy's global stream (transformers' Trainer checkpoints it) drew the
    pre-checkpoint numbers again after a resume."""
    import numpy as np

    draws = []

    def noisy(prompts, completions, completion_ids, **kw):
        noise = np.random.normal(size=len(completion_ids))
        draws.append(round(float(noise[0]), 12))
        return [float(len(ids)) / 8 + 0.1 * e for ids, e in zip(completion_ids, noise)]

    run = dict(max_steps=4, per_device_train_batch_size=8, save_strategy="steps", save_steps=2)
    (straight, _), (resumed, _), _ = _resumed_pair(tmp_path, tok, {}, "checkpoint-2", reward=noisy, **run)
    assert draws[4:] == draws[2:4] and draws[2:4] != draws[:2]
    assert all(torch.equal(a, b) for a, b in zip(_params(straight).values(), _params(resumed).values()))


def test_a_stream_resumed_with_a_larger_max_steps_is_not_called_another_dataset(tmp_path, tok):
    """A streamed set is read as far as max_steps needs, so the prompts' fingerprint changed with max_steps and the
    documented way to go on warned "another train_dataset"."""
    from .test_ppo import prompts

    run = dict(per_device_train_batch_size=8, save_strategy="steps", save_steps=2, lr_scheduler_type="constant")
    data = lambda: prompts().to_iterable_dataset()  # noqa: E731
    (straight, _), (resumed, _), said = _resumed_pair(tmp_path, tok, dict(max_steps=2, data=data()), "checkpoint-2",
                                                      dict(max_steps=4, data=data()), **run)
    assert not [m for m in said if m.startswith("Resuming from")], said
    whole = make(tmp_path / "whole", tok, max_steps=4, data=data(), **run)
    whole.train()
    assert all(torch.equal(a, b) for a, b in zip(_params(whole).values(), _params(resumed).values()))



# -- an exception mid-run: the iterations that finished are saved, the failed one undone ------------------------------
class _Raises(TrainerCallback):
    """on_step_end raises once, after iteration `at` (a user's callback, an evaluation, a log that fails)."""

    def __init__(self, at: int):
        self.at, self.done = at, False

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at and not self.done:
            self.done = True
            raise OSError("the tracker's disk is full")


def _once_in_iteration(box: dict, at: int, call, error: Exception):
    """`call` that raises `error` once, in iteration `at` + 1 (while `box["tr"].iteration == at`)."""
    def failing(*a, **kw):
        if box["tr"].iteration == at and not box.get("failed"):
            box["failed"] = True
            raise error
        return call(*a, **kw)

    return failing


def _notes(e) -> str:
    return " ".join(getattr(e.value, "__notes__", []))


@pytest.mark.parametrize("where", ["reward server", "theta_old pass"])
def test_a_failed_iteration_is_undone_and_the_finished_ones_saved(straight, tmp_path, tok, where):
    """A reward server that does not answer in iteration 4 (scoring), or an out-of-memory error in its θ_old pass
    (after sampling, scoring and the debias shaper's update), with save_strategy "no": every iteration was lost.
    The three that finished are saved as checkpoint-3 — the failed one undone: its samples, data position and
    reward statistics (iteration 4: its responses vary in length, so the debias shaper's slope moves; every response
    of iteration 3 is 24 tokens long, and the slope stays) —, the exception says so, and the resumed run ends where
    the run that never failed ends, bit for bit."""
    from .test_ppo import good_counter

    ckpt, hist, params = straight
    box = {}
    if where == "reward server":
        positive_words = _once_in_iteration(box, 3, good_counter(tok), ConnectionError("the reward server is down"))
        positive_words.__name__ = "positive_words"  # the straight run's reward, by name (its statistics' key)
        tr = box["tr"] = make(tmp_path, tok, reward=positive_words, **RUN)
        error = ConnectionError
    else:
        tr = box["tr"] = make(tmp_path, tok, **RUN)
        tr._full_forward = _once_in_iteration(box, 3, tr._full_forward, torch.OutOfMemoryError("out of memory"))
        error = torch.OutOfMemoryError
    with pytest.raises(error) as e:
        tr.train()
    saved = tmp_path / "ppo" / "checkpoint-3"
    assert saved.is_dir() and f"{saved} holds the 3 iteration(s) that finished (the failed one is undone" in _notes(e)
    assert not (tmp_path / "ppo" / "checkpoint-4").exists()
    tr, resumed, said = _resume(tmp_path / "again", tok, saved)
    assert [h["loss/policy"] for h in resumed] == [h["loss/policy"] for h in hist]  # the run that never failed
    now = _params(tr)
    assert all(torch.equal(now[k], params[k]) for k in params)


def test_a_failure_after_the_iterations_update_names_the_newest_checkpoint(tmp_path, tok):
    """Once the adapters have taken a step the iteration cannot be undone: nothing is saved, and the exception names
    the newest checkpoint there is (here: none)."""
    box = {}
    tr = box["tr"] = make(tmp_path, tok, **RUN)
    tr._step_schedule = _once_in_iteration(box, 2, tr._step_schedule, RuntimeError("a scheduler bug"))
    with pytest.raises(RuntimeError) as e:
        tr.train()
    assert "failed after the adapters had taken a step" in _notes(e) and "no checkpoint was saved" in _notes(e)
    assert not list((tmp_path / "ppo").glob("checkpoint-*"))


def test_a_failure_after_an_iteration_keeps_it(straight, tmp_path, tok):
    """A callback that raises after iteration 3 (on_step_end): checkpoint-3 holds it, and the resumed run finishes
    as the straight run does."""
    ckpt, hist, params = straight
    tr = make(tmp_path, tok, callbacks=[_Raises(3)], **RUN)
    with pytest.raises(OSError) as e:
        tr.train()
    saved = tmp_path / "ppo" / "checkpoint-3"
    assert saved.is_dir() and f"{saved} holds the 3 iteration(s) that finished (this error came after it)" in _notes(e)
    tr, resumed, said = _resume(tmp_path / "again", tok, saved)
    assert [h["loss/policy"] for h in resumed] == [h["loss/policy"] for h in hist]
    now = _params(tr)
    assert all(torch.equal(now[k], params[k]) for k in params)


@pytest.mark.parametrize("where", ["backward", "audit"])
def test_a_failed_iteration_retried_on_the_same_trainer_is_the_run_that_never_failed(straight, tmp_path, tok, where):
    """The note's advice taken on the same trainer (a notebook): an error after iteration 3's backward (an OOM in
    it) left the gradients in .grad, and one in an audit judge left the reward function's log_extra() values
    pending — the retry added both to its own (its first step trained on two gradients; log_extra refused 16 values
    for 8 completions)."""
    from .test_ppo import good_counter

    base, box = good_counter(tok), {}

    def positive_words(prompts, completions, completion_ids, log_extra=None, **kw):
        out = base(prompts, completions, completion_ids)
        log_extra("positive", out)
        return out

    def judge(prompts, completions, completion_ids, **kw):
        if box["tr"].iteration == 2 and where == "audit" and not box.get("failed"):
            box["failed"] = True
            raise ConnectionError("the judge's server is down")
        return [0.0] * len(prompts)

    ckpt, hist, params = straight
    tr = box["tr"] = make(tmp_path, tok, reward=positive_words, audit_funcs=[judge], **RUN)
    backward = tr.accelerator.backward

    def failing(*a, **kw):
        backward(*a, **kw)
        if tr.iteration == 2 and where == "backward" and not box.get("failed"):
            box["failed"] = True
            raise torch.OutOfMemoryError("out of memory")

    tr.accelerator.backward = failing
    with pytest.raises((torch.OutOfMemoryError, ConnectionError)):
        tr.train()
    resumed = tr.train(resume_from_checkpoint=True)
    assert [h["loss/policy"] for h in resumed] == [h["loss/policy"] for h in hist]
    now = _params(tr)
    assert all(torch.equal(now[k], params[k]) for k in params)


def test_the_kl_guard_moving_the_adapters_is_not_undone(tmp_path, tok):
    """Every step of iteration 3 skipped (a non-finite loss), then the hard-KL guard, finding the batch above δ,
    shrinks the adapters towards the anchor — with no optimizer step taken. An error after that (here in the guard's
    own measurement) cannot be undone: checkpoint-2 would have held iteration 3's shrunk adapters."""
    box = {}
    tr = box["tr"] = make(tmp_path, tok, **{**RUN, "kl_target": 0.2})
    step = tr._step
    tr._step = lambda loss, stats: step(loss * float("nan") if tr.iteration == 2 else loss, stats)
    enforce, moved = tr.kl_guard.enforce, []

    def failing(before, kl, measure, *a, **kw):
        if tr.iteration != 2:
            return enforce(before, kl, measure, *a, **kw)

        def measure_once():  # the bisection's first measurement: the adapters have moved, then an OOM
            moved.append(any(not torch.equal(p, b) for p, b in zip(tr.kl_guard.params, before)))
            raise torch.OutOfMemoryError("out of memory")

        return enforce(before, kl, measure_once, *a, **kw)

    tr.kl_guard.enforce = failing
    with pytest.raises(torch.OutOfMemoryError) as e:
        tr.train()
    assert moved == [True]  # the guard ran in iteration 3 and had moved the adapters
    assert "cannot be undone" in _notes(e) and not list((tmp_path / "ppo").glob("checkpoint-*"))


def test_a_reward_member_failing_in_the_monitors_review_scoring_leaves_the_statistics(tmp_path, tok):
    """The monitor scores a reference answer beside each queued sample, its running statistics put back after; a
    reward server that fails there (after iteration 3, on_step_end) left the member scored before it moved by
    those answers, and checkpoint-3 — saved after the failure — kept them (count 26 where the run had seen 24)."""
    from .test_ppo import good_counter

    local, box = good_counter(tok), {}

    def server(prompts, completions, completion_ids, **kw):
        if box.get("tr") is not None and "log_metric" not in kw and box["tr"].iteration == 3 and not box.get("failed"):
            box["failed"] = True  # the monitor's scoring (log=False): the training scoring passes log_metric
            raise ConnectionError("the reward server is down")
        return [float(len(c) % 3) for c in completion_ids]

    run = {**RUN, "monitor_detectors": [{"name": "length_correlation", "threshold": -2.0, "action": "queue", "z": 0}],
           "monitor_cooldown": 1}  # a review pair queued after every iteration
    make(tmp_path / "straight", tok, reward=[local, server], save_strategy="steps", save_steps=3, **run).train()
    expected = json.loads((tmp_path / "straight" / "ppo" / "checkpoint-3" / "ppo_state.json").read_text())["rewards"]
    tr = box["tr"] = make(tmp_path / "failing", tok, reward=[local, server], **run)
    with pytest.raises(ConnectionError):
        tr.train()
    saved = json.loads((tmp_path / "failing" / "ppo" / "checkpoint-3" / "ppo_state.json").read_text())
    assert saved["rewards"] == expected


def test_a_failure_in_the_runs_closing_callbacks_keeps_every_iteration(tmp_path, tok):
    """on_train_end (a tracker closing its run) that raises after the last iteration: with save_strategy "no" the
    whole run was lost."""
    class ClosingFails(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            raise OSError("the tracker's server is down")

    tr = make(tmp_path, tok, callbacks=[ClosingFails()], **RUN)
    with pytest.raises(OSError) as e:
        tr.train()
    saved = tmp_path / "ppo" / "checkpoint-4"
    assert saved.is_dir() and f"{saved} holds the 4 iteration(s) that finished" in _notes(e)


def test_a_checkpoint_of_rlhf_ext_0_1_is_refused_naming_what_to_do(straight, tmp_path, tok):
    """0.1 wrote no manifest and no KL anchor: its checkpoints were called damaged ("anchor.safetensors: missing"),
    and the fixes offered went round in a circle (resume=True: "no complete checkpoint"; a new run: "resume it")."""
    import shutil

    ckpt = straight[0]
    old = tmp_path / "checkpoint-2"
    shutil.copytree(ckpt, old)
    (old / "manifest.json").unlink()
    (old / "anchor.safetensors").unlink()
    with pytest.raises(ValueError, match=r"written by rlhf_ext 0\.1 .* Start a new run .* policy adapter is in"):
        make(tmp_path / "new", tok, **RUN).train(resume_from_checkpoint=str(old))


def test_an_out_of_memory_error_frees_the_failed_iterations_tensors(tmp_path, tok):
    """After an OOM the failed iteration's tensors stay referenced by its frames on the exception's traceback —
    on a GPU the memory the save after the failure, and the user's next step in the process, need. They are freed
    (as the reward trainer does) before checkpoint-N is written."""
    import weakref

    from .test_ppo import good_counter

    local, held, box = good_counter(tok), [], {}

    def server(prompts, completions, completion_ids, **kw):
        activations = torch.ones(256, 256)  # what a failed forward holds in its frame
        if box["tr"].iteration == 2:
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [0.0] * len(completion_ids)

    tr = box["tr"] = make(tmp_path, tok, reward=[local, server], **RUN)
    with pytest.raises(torch.OutOfMemoryError) as e:
        tr.train()
    assert "checkpoint-2 holds the 2 iteration(s) that finished" in _notes(e)
    assert held and held[0]() is None  # the frame's tensor was freed, the exception still in hand


def test_an_out_of_memory_error_in_the_first_iteration_frees_its_tensors_too(tmp_path, tok):
    """The most common out-of-memory error is the first iteration's (a batch size tried): nothing is saved, and its
    tensors stayed referenced by the traceback's frames, held for the user's next try in the same process (a
    notebook keeps the traceback)."""
    import weakref

    from .test_ppo import good_counter

    local, held, box = good_counter(tok), [], {}

    def server(prompts, completions, completion_ids, **kw):
        activations = torch.ones(256, 256)  # what a failed forward holds in its frame
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory")

    tr = box["tr"] = make(tmp_path, tok, reward=[local, server], **RUN)
    with pytest.raises(torch.OutOfMemoryError) as e:  # the exception in hand, as a notebook holds it
        tr.train()
    assert tr.iteration == 0 and held and held[0]() is None and e.value.__traceback__ is not None
