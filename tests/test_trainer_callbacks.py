"""PPOTrainer in transformers' callback flow, event for event against transformers' own Trainer on the same tiny LM:
the cadences come from DefaultFlowCallback's control flags (so eval_delay, the end-of-run save and evaluation and a
callback's own requests are honoured), epochs begin and end, EarlyStoppingCallback stops a run, and a resumed run
takes back its TrainerState (log history, epoch, the early-stopping counter)."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from rlhf_ext.testing import tiny_causal_lm

from .test_ppo import make, prompts


class Events(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_epoch_begin(self, args, state, control, **kw):
        self.seen.append(("epoch_begin", state.global_step))

    def on_epoch_end(self, args, state, control, **kw):
        self.seen.append(("epoch_end", state.global_step, state.epoch))

    def on_evaluate(self, args, state, control, **kw):
        self.seen.append(("evaluate", state.global_step))

    def on_save(self, args, state, control, **kw):
        self.seen.append(("save", state.global_step))

    def on_log(self, args, state, control, logs=None, **kw):
        if not any(k.startswith("eval_") for k in logs) and "train_runtime" not in logs:
            self.seen.append(("log", state.global_step))


def _hf_trainer(tmp_path, tok, callbacks, **kw):
    """transformers' Trainer on a tiny LM, 8 rows in batches of 4: the same steps per epoch as `make(..., 8 prompts)`."""
    ids = [tok(f"write a short review of the {w} .")["input_ids"][:6] for w in "abcdefgh"]
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=4, use_cpu=True, disable_tqdm=True,
                             report_to="none", seed=0, **kw)
    return Trainer(tiny_causal_lm(tok), args=args, train_dataset=ds, eval_dataset=ds.select(range(2)),
                   callbacks=callbacks)


def _ppo(tmp_path, tok, callbacks, **kw):
    base = dict(per_device_train_batch_size=4, max_completion_length=6, logging_steps=1)
    return make(tmp_path, tok, data=prompts(8), eval_dataset=prompts(2), callbacks=callbacks, **{**base, **kw})


@pytest.mark.parametrize("kw", [
    dict(max_steps=3, logging_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2),
    dict(max_steps=3, logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch"),
    dict(max_steps=4, logging_first_step=True, logging_steps=3, eval_strategy="steps", eval_steps=1, eval_delay=3,
         save_strategy="no"),
], ids=["steps-end-of-run", "epoch-partial-last", "first-step-eval-delay"])
def test_cadences_and_epochs_fire_as_in_transformers_trainer(tmp_path, tok, kw):
    ours, theirs = Events(), Events()
    _ppo(tmp_path, tok, [ours], **kw).train()
    _hf_trainer(tmp_path, tok, [theirs], **kw).train()
    assert ours.seen == theirs.seen


def test_a_callbacks_own_requests_are_honoured(tmp_path, tok):
    """control.should_save / should_evaluate / should_log set by a callback: transformers' documented way to ask for
    an extra checkpoint, evaluation or log (they were ignored: no checkpoint, an empty log history)."""

    class AskAtStep1(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                control.should_save = control.should_evaluate = control.should_log = True

    tr = _ppo(tmp_path, tok, [AskAtStep1()], max_steps=2, logging_strategy="no", save_strategy="no")
    tr.train()
    assert sorted(p.name for p in (tmp_path / "ppo").glob("checkpoint-*")) == ["checkpoint-1"]
    logged = [(h["step"], any(k.startswith("eval_") for k in h), "train_runtime" in h) for h in tr.state.log_history]
    assert logged == [(1, False, False), (1, True, False), (2, False, True)]  # the last: Trainer's closing summary


def test_early_stopping_stops_and_its_counter_resumes(tmp_path, tok):
    """EarlyStoppingCallback reads state.best_metric, which evaluation during training now sets: with no evaluation
    counting as an improvement it stops after `patience` of them; the counter and the log history come back with a
    checkpoint."""
    kw = dict(max_steps=6, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
              metric_for_best_model="eval_kl", greater_is_better=False)
    tr = _ppo(tmp_path, tok, [EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=1e9)], **kw)
    tr.train()
    assert tr.state.global_step == 3 and tr.state.best_global_step == 1
    assert tr.state.best_metric == [h for h in tr.state.log_history if "eval_kl" in h][0]["eval_kl"]
    resumed = _ppo(tmp_path, tok, [EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=1e9)],
                   restore_callback_states_from_checkpoint=True, **kw)  # transformers' switch, off by default
    resumed.train(resume_from_checkpoint=str(tmp_path / "ppo" / "checkpoint-2"))
    # checkpoint-2 holds one strike; one more evaluation without improvement stops at step 3 again
    assert resumed.state.global_step == 3
    assert [h["step"] for h in resumed.state.log_history if "objective/kl" in h] == [1, 2, 3]


def test_epoch_is_whole_at_the_end_of_each_pass(tmp_path, tok):
    """10 prompts in batches of 4: a pass is 2 iterations (the remainder is dropped, as transformers' drop_last),
    so its end reads epoch 1.0, not 0.8."""
    tr = make(tmp_path, tok, data=prompts(10), per_device_train_batch_size=4, max_completion_length=6,
              num_train_epochs=2, max_steps=-1, logging_strategy="epoch")
    out = tr.train()
    assert [h["epoch"] for h in tr.state.log_history if "objective/kl" in h] == [1.0, 2.0]
    assert out.metrics["epoch"] == 2.0 and tr.state.log_history[-1]["train_runtime"] == out.metrics["train_runtime"]


def test_an_iteration_is_logged_once(tmp_path, tok):
    """logging_first_step and an epoch of one iteration both ask to log iteration 1 (after on_step_end and again after
    on_epoch_end): Trainer logs a step once."""
    tr = make(tmp_path, tok, data=prompts(4), per_device_train_batch_size=4, max_completion_length=6, max_steps=2,
              logging_first_step=True, logging_strategy="epoch")
    tr.train()
    steps = [h["step"] for h in tr.state.log_history if "objective/kl" in h]
    assert steps == [1, 2]
