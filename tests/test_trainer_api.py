"""PPOTrainer's transformers `Trainer` API as a user reaches for it on the trainer object: what callbacks are given
during train(), train() called again on the same trainer (finished, or with max_steps raised), and transformers'
supervised-training entry points PPO has no use for, each refused naming what to use instead."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from .test_ppo import make, prompts

SMALL = dict(data=prompts(8), per_device_train_batch_size=4, max_completion_length=6)


class RatesUsed(TrainerCallback):
    """The learning rate each iteration trains with (the optimizer's, as callbacks are given it), and the types of
    the optimizer and scheduler callbacks receive."""

    def __init__(self):
        self.rates, self.given = [], set()

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        self.given.add((type(optimizer).__name__, type(lr_scheduler).__name__))
        self.rates.append(optimizer.param_groups[0]["lr"] if optimizer is not None else None)


def test_callbacks_are_given_the_optimizer_and_scheduler_as_trainer_gives_them(tmp_path, tok):
    seen = RatesUsed()
    make(tmp_path, tok, max_steps=2, callbacks=[seen], **SMALL).train()
    assert seen.given == {("AdamW", "LambdaLR")}  # transformers' loop: the trainer's own; PPO gave None
    assert seen.rates == [pytest.approx(0.03), pytest.approx(0.015)]


def _params(tr):
    return {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}


def test_a_run_continued_on_the_same_trainer_trains_at_the_schedules_position(tmp_path, tok):
    """train(), max_steps raised, train() again: iterations 3-4 train at positions 2-3 of the 4-iteration schedule
    (the 2-iteration schedule ended at 0: they trained at learning rate 0, the adapters never moved)."""
    seen = RatesUsed()
    tr = make(tmp_path, tok, max_steps=2, callbacks=[seen], **SMALL)
    tr.train()
    before = _params(tr)
    tr.args.max_steps = 4
    tr.train()
    assert seen.rates[2:] == [pytest.approx(0.015), pytest.approx(0.0075)]
    assert any(not (p == before[n]).all() for n, p in _params(tr).items())
    assert tr.state.global_step == tr.iteration == 4


def test_a_resume_with_a_raised_max_steps_trains_its_first_iteration_at_the_schedules_position(tmp_path, tok):
    """The optimizer's saved state holds the rate of the shorter run's last step (0 at the end of a linear decay);
    the resumed iteration trains at the new schedule's rate at its iteration, as every later one does."""
    make(tmp_path, tok, max_steps=2, save_strategy="steps", save_steps=2, **SMALL).train()
    seen = RatesUsed()
    make(tmp_path, tok, max_steps=4, save_strategy="steps", save_steps=2, callbacks=[seen],
         **SMALL).train(resume_from_checkpoint=True)
    assert seen.rates == [pytest.approx(0.015), pytest.approx(0.0075)]


def test_train_again_on_a_finished_trainer_says_so_and_keeps_its_state(tmp_path, tok, capsys):
    tr = make(tmp_path, tok, max_steps=2, **SMALL)
    tr.train()
    logged = len(tr.state.log_history)
    capsys.readouterr()
    tr.train()
    assert "Nothing to train: this trainer is at iteration 2" in capsys.readouterr().err
    assert tr.state.global_step == 2  # was reset to 0 (and trainer_state.json said 0 after save_state())
    assert len(tr.state.log_history) == logged


def test_supervised_entry_points_name_what_ppo_uses_instead(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=1, eval_dataset=prompts(2), **SMALL)
    calls = {"predict": lambda: tr.predict(prompts(2)), "get_eval_dataloader": tr.get_eval_dataloader,
             "get_test_dataloader": lambda: tr.get_test_dataloader(prompts(2)),
             "compute_loss": lambda: tr.compute_loss(tr.model, {}), "training_step": lambda: tr.training_step(tr.model, {}),
             "hyperparameter_search": lambda: tr.hyperparameter_search(n_trials=1),
             "train(trial=…)": lambda: tr.train(trial={"learning_rate": 1e-3})}
    for name, call in calls.items():  # were transformers' "No columns in the dataset match…", "did not return a loss"
        with pytest.raises(NotImplementedError, match="evaluate|train\\(\\)|PPOTrainer"):
            call()
    with pytest.raises(TypeError):  # a mistyped keyword was swallowed (**kwargs) and the run trained as if unsaid
        tr.train(resume_from_chekpoint=True)
    assert tr.iteration == 0


def test_create_model_card_names_itself_when_refusing_a_keyword(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=1, **SMALL)
    with pytest.raises(TypeError, match=r"PPOTrainer\.create_model_card\(\) got unexpected keyword argument.*'tag'"):
        tr.create_model_card(tag="x")


def test_the_trainer_reads_the_config_it_was_given_as_trainer_does(tmp_path, tok):
    """`trainer.args is args`, as in transformers: max_steps raised on the config in hand (the notebook idiom)
    continues the run."""
    from peft import LoraConfig

    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.testing import tiny_causal_lm

    from .test_ppo import LORA, good_counter

    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1, max_completion_length=6,
                     use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1000)
    tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=good_counter(tok), args=args, train_dataset=prompts(8),
                    processing_class=tok, peft_config=LoraConfig(**LORA))
    assert tr.args is args
    tr.train()
    args.max_steps = 2
    tr.train()
    assert tr.iteration == 2
