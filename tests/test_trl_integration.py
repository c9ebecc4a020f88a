"""Our ensembles, shapers and KL controllers inside TRL's own GRPOTrainer / RLOOTrainer."""

import math
import warnings

import pytest
import torch
from datasets import Dataset

from rlhf_ext import KLControllerCallback, RewardPipeline, build, build_controller
from rlhf_ext.plugins.shaping import as_reward_func
from rlhf_ext.testing import tiny_causal_lm


def _prompts():
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"write a short review of the {w} ."}]
                                         for w in "movie book song film".split() * 2]})


def _rewards(tok):
    good = tok.convert_tokens_to_ids("good")

    def count_good(prompts, completions, completion_ids, **kw):
        return [float(sum(t == good for t in ids)) for ids in completion_ids]

    def count_len(prompts, completions, completion_ids, **kw):
        return [len(ids) / 10 for ids in completion_ids]

    calls = []

    def tracked(**kw):
        calls.append(1)
        return pipeline(**kw)

    pipeline = RewardPipeline([count_good, count_len], aggregation="uwo", aggregation_kwargs={"lam": 0.5},
                              shapers=[{"name": "repetition", "alpha": 0.5}], eos_token_id=tok.eos_token_id)
    tracked.__name__ = "ensemble"
    penalty = as_reward_func(build("shaper", "linear", alpha=0.05, free_tokens=2), tok)
    return [tracked, penalty], calls


@pytest.mark.parametrize("trainer_name", ["grpo", "rloo"])
def test_ensemble_shaper_and_kl_controller_in_trl(tmp_path, tok, trainer_name):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    Config, Trainer = (GRPOConfig, GRPOTrainer) if trainer_name == "grpo" else (RLOOConfig, RLOOTrainer)
    args = Config(str(tmp_path / trainer_name), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=8, max_steps=3, beta=0.1, learning_rate=1e-3, use_cpu=True, bf16=False,
                  report_to="none", logging_steps=1, save_strategy="no", gradient_checkpointing=False,
                  disable_tqdm=True)
    funcs, calls = _rewards(tok)
    from peft import LoraConfig

    trainer = Trainer(model=tiny_causal_lm(tok), reward_funcs=funcs, args=args, train_dataset=_prompts(),
                      processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ctl = build_controller("lagrangian", 0.1, 0.05, lr=1.0)  # KL ≈ 0 ≪ δ: β must fall
    trainer.add_callback(KLControllerCallback(ctl, trainer))
    trainer.train()
    assert calls, "the ensemble pipeline was never called by TRL"
    logged = [h for h in trainer.state.log_history if "kl_controller/beta" in h]
    assert len(logged) == 3 and logged[-1]["kl_controller/beta"] == pytest.approx(trainer.beta)
    replay = build_controller("lagrangian", 0.1, 0.05, lr=1.0)
    for h in logged:
        replay.update(h["kl"])
    assert trainer.beta == pytest.approx(max(replay.beta, 1e-6)) and trainer.beta < 0.1


def test_ppo_takes_a_trl_reward_model_folder_as_grpo_does(tmp_path, tok, tiny_path, pref_data):
    """TRL's online trainers take a reward given as a string to be a sequence-classification model (a Hub id, or
    the folder trl.RewardTrainer saved). PPOTrainer used to refuse it (not an rlhf_ext artifact); now it loads it
    with num_labels=1 and scores with its own tokenizer — the same run, number for number, as handing PPOTrainer the
    model instance itself (the TRL 1.12 `reward_model=` path)."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from .test_ppo import make

    rm_dir = tmp_path / "trl_rm"
    rt = RewardTrainer(model=tiny_path, train_dataset=pref_data[0], processing_class=tok,
                       args=RewardConfig(str(rm_dir), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
                                         bf16=False, report_to="none", save_strategy="no",
                                         gradient_checkpointing=False, disable_tqdm=True))
    rt.train()
    rt.save_model(str(rm_dir))
    by_name = make(tmp_path / "by_name", tok, reward=str(rm_dir), max_steps=2).train()
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    by_model = make(tmp_path / "by_model", tok, reward=model, max_steps=2).train()
    assert [h["objective/scores"] for h in by_name] == [h["objective/scores"] for h in by_model]
    assert len({h["objective/scores"] for h in by_name}) == 2  # the reward model scores: not a constant


def test_ppo_reward_string_that_is_neither_says_what_to_pass(tmp_path, tok):
    from .test_ppo import make

    with pytest.raises(ValueError, match=r"neither an rlhf_ext reward-model artifact .* nor a sequence-classification "
                                         r"model.*what trl.RewardTrainer saves"):
        make(tmp_path, tok, reward=str(tmp_path / "nowhere"), max_steps=1)


# --------------------------------------------------------------- our callbacks and pipeline inside GRPO / RLOO
def _grpo(tmp_path, tok, reward_funcs, model=None, callbacks=None, eval_dataset=None, **overrides):
    """A tiny GRPOTrainer (LoRA, so the reference is the base with the adapter off); `overrides` go to GRPOConfig."""
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    kw = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=8, max_steps=2, beta=0.1,
              learning_rate=1e-3, use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
              gradient_checkpointing=False, disable_tqdm=True, seed=0)
    kw.update(overrides)
    return GRPOTrainer(model=model or tiny_causal_lm(tok), reward_funcs=reward_funcs,
                       args=GRPOConfig(str(tmp_path), **kw), train_dataset=_prompts(), processing_class=tok,
                       callbacks=callbacks, eval_dataset=eval_dataset,
                       peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _distinct(completion_ids, **kw):
    return [float(len(set(ids))) for ids in completion_ids]


def _first_token(completion_ids, **kw):
    return [float(ids[0] % 5) for ids in completion_ids]


def _betas_used(trainer) -> list:
    """The β each optimizer step's loss used (GRPO reads trainer.beta in compute_loss)."""
    used, loss = [], trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: (used.append(trainer.beta), loss(*a, **k))[1]
    return used


def test_kl_callback_refuses_setups_where_it_would_do_nothing(tmp_path, tok):
    """Passed in callbacks=[...] it has no trainer to set β on; at beta=0 TRL never computes the KL. Both used to
    train on silently with β untouched."""
    ctl = build_controller("adaptive", 0.1, 1.0, horizon=2)
    trainer = _grpo(tmp_path / "a", tok, [_distinct], callbacks=[KLControllerCallback(ctl)])
    with pytest.raises(ValueError, match=r"no trainer.*"
                                         r"trainer\.add_callback\(KLControllerCallback\(controller, trainer\)\)"):
        trainer.train()
    trainer = _grpo(tmp_path / "b", tok, [_distinct], beta=0.0)
    trainer.add_callback(KLControllerCallback(ctl, trainer))
    with pytest.raises(ValueError, match=r"beta is 0.*Set `beta` > 0"):
        trainer.train()


def test_kl_callback_first_step_uses_the_controllers_beta(tmp_path, tok):
    """The steps before the first log used args.beta (0.04), not the controller's β (0.1)."""
    trainer = _grpo(tmp_path, tok, [_distinct], beta=0.04)
    trainer.add_callback(KLControllerCallback(build_controller("fixed", 0.1, None), trainer))
    used = _betas_used(trainer)
    trainer.train()
    assert used == [0.1, 0.1]


def test_kl_callback_skips_a_kl_logged_as_none():
    """TRL logs None for a window whose KL values were all NaN: float(None) used to crash training."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(beta=0.1)
    cb = KLControllerCallback(build_controller("adaptive", 0.1, 1.0), trainer)
    logs = {"kl": None, "reward": 0.5}
    cb.on_log(None, SimpleNamespace(log_history=[dict(logs)], global_step=1), None, logs=logs)
    assert trainer.beta == 0.1 and cb.controller.beta == 0.1 and "kl_controller/beta" not in logs


def test_kl_callback_adaptive_horizon_counts_completions(tmp_path, tok):
    """Ziegler's horizon is in samples (PPOTrainer passes n_steps = rollouts per update): per log, the callback
    passes the completions generated since its last update — per_device_train_batch_size × gradient_accumulation
    × world size per optimizer step, times logging_steps — not 1."""
    trainer = _grpo(tmp_path, tok, [_distinct], max_steps=4, logging_steps=2, gradient_accumulation_steps=2)
    trainer.add_callback(KLControllerCallback(build_controller("adaptive", 0.1, 1.0, horizon=100), trainer))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "kl_controller/beta" in h]
    replay = build_controller("adaptive", 0.1, 1.0, horizon=100)
    expected = [replay.update(h["kl"], n_steps=4 * 2 * 2) for h in logged]  # 4 completions × 2 accumulation × 2 steps
    assert len(logged) == 2 and [h["kl_controller/beta"] for h in logged] == pytest.approx(expected)
    assert expected[-1] < 0.1 * 0.99  # KL ≪ target: β fell by a visible amount (≈ 3 % per log)


def test_kl_controller_state_survives_a_trl_resume(tmp_path, tok, tiny_path):
    """The controller's β used to restart from args.beta on resume_from_checkpoint; it now continues from the
    checkpoint (KL ≪ target clips the adaptive update, so β follows the same path in both runs)."""

    def run(resume=None):
        trainer = _grpo(tmp_path, tok, [_distinct], model=tiny_path, max_steps=4, save_strategy="steps",
                        save_steps=2, learning_rate=5e-2)
        trainer.add_callback(KLControllerCallback(build_controller("adaptive", 0.1, 1.0, horizon=10), trainer))
        used = _betas_used(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return used

    full = run()
    assert run(str(tmp_path / "checkpoint-2")) == pytest.approx(full[2:])  # used to be [0.1, …] again
    assert full == pytest.approx([0.1 * 0.92 ** k for k in range(4)])  # × (1 − 0.2 · 4 completions / 10) per step


def test_pipeline_state_survives_a_trl_resume(tmp_path, tok, tiny_path):
    """The running mean/std of the pipeline's callables used to restart on a TRL resume (re-normalising the same
    completions differently); `pipeline.callback()` saves it with the checkpoint."""

    def run(resume=None):
        pipeline = RewardPipeline([_distinct, _first_token])  # two columns: running normalisation
        trainer = _grpo(tmp_path, tok, [pipeline], model=tiny_path, max_steps=4, save_strategy="steps", save_steps=2,
                        learning_rate=5e-2, callbacks=[pipeline.callback()])
        trainer.train(resume_from_checkpoint=resume)
        return pipeline.state_dict()["members"]

    full = run()
    resumed = run(str(tmp_path / "checkpoint-2"))
    assert full["_distinct"]["count"] == resumed["_distinct"]["count"] == 16
    for name in full:
        assert resumed[name]["mean"] == pytest.approx(full[name]["mean"])
        assert resumed[name]["m2"] == pytest.approx(full[name]["m2"])


def test_two_pipelines_with_one_name_refuse_to_share_checkpoint_state(tmp_path, tok):
    a, b = RewardPipeline([_distinct]), RewardPipeline([_first_token])
    trainer = _grpo(tmp_path, tok, [a, b], callbacks=[a.callback(), b.callback()])
    with pytest.raises(ValueError, match=r"Two reward pipelines named 'rlhf_ext_mean'.*name=\.\.\."):
        trainer.train()


def _judge(completion_ids, **kw):  # an LLM judge that timed out on the first two completions of every four
    return [None if i % 4 < 2 else float(len(set(ids))) for i, ids in enumerate(completion_ids)]


def test_dropped_warning_says_trl_trains_them_beside_another_reward_function(tmp_path, tok):
    """Beside another reward function TRL nansums the rows, so a sample the pipeline returns None for is trained
    on: the warning used to say it was 'dropped from the loss'."""
    penalty = as_reward_func(build("shaper", "linear", alpha=0.05, free_tokens=2), tok)
    trainer = _grpo(tmp_path, tok, [RewardPipeline([_judge]), penalty], max_steps=1)
    with pytest.warns(UserWarning, match=r"non-finite.*GRPOTrainer has other reward functions.*shaper_linear.*NOT "
                                         r"dropped.*shapers inside the pipeline") as caught:
        trainer.train()
    assert not any("dropped from the loss" in str(w.message) for w in caught)


def test_dropped_warning_called_outside_a_trainer():
    pipeline = RewardPipeline([_judge])
    with pytest.warns(UserWarning, match=r"TRL's GRPOTrainer / RLOOTrainer leave a completion out only when every "
                                         r"reward function returns None.*shapers=\[\.\.\.\]"):
        assert pipeline(completions=["a"] * 4, completion_ids=[[1, 2]] * 4)[:2] == [None, None]


def _judge_nan(completion_ids, **kw):  # a judge whose parser failed on the first two completions of every four
    return [math.nan if i % 4 < 2 else float(len(set(ids))) for i, ids in enumerate(completion_ids)]


def test_pipeline_logs_its_metrics_through_trl(tmp_path, tok):
    """TRL passes log_metric; the pipeline used to log none of PPOTrainer's reward metrics through it. (A member's
    NaN drops the sample; its None — not applicable — leaves the sample to the other members: both below.)"""
    calls = {}

    def log_metric(name, value):
        calls.setdefault(name, []).append(value)

    ids = [[1, 2, 3], [4, 4], [5, 6, 6], [7]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped
        out = RewardPipeline([_judge, _first_token], callable_normalization="none")(
            completions=["x"] * 4, completion_ids=ids, log_metric=log_metric)
    assert out == [1.0 / 2, 4.0 / 2, (2 + 0) / 2, (1 + 2) / 2]  # the first two by _first_token alone: TRL's nansum / K
    assert calls["rewards/dropped_nonfinite"] == [0.0] and calls["rewards/_judge_raw"] == [pytest.approx(1.5)]
    assert calls["rewards/_first_token_raw"] == [pytest.approx((1 + 4 + 0 + 2) / 4)]
    calls.clear()

    pipeline = RewardPipeline([_judge_nan, _first_token])
    with pytest.warns(UserWarning, match="non-finite"):
        out = pipeline(completions=["x"] * 4, completion_ids=ids, log_metric=log_metric)
    assert out[:2] == [None, None] and None not in out[2:]
    assert calls["rewards/dropped_nonfinite"] == [2.0]
    assert calls["rewards/_judge_nan_raw"] == [pytest.approx((2 + 1) / 2)]  # the kept samples only: no NaN
    assert calls["rewards/_first_token_raw"] == [pytest.approx((5 % 5 + 7 % 5) / 2)]
    assert "rewards/ensemble_std" in calls and math.isfinite(calls["rewards/ensemble_std"][0])

    trainer = _grpo(tmp_path, tok, [RewardPipeline([_judge_nan, _first_token])], max_steps=1)
    with pytest.warns(UserWarning, match="non-finite.*TRL leaves a completion that every reward function returned "
                                         "None for out of training"):  # alone in TRL: truly dropped
        trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["rewards/dropped_nonfinite"] == 2.0  # the first 2 of the step's 4 completions
    assert all(math.isfinite(logged[k]) for k in ("rewards/_judge_nan_raw", "rewards/_first_token_raw",
                                                  "rewards/ensemble_std"))


def test_reward_functions_take_a_name_so_two_of_a_kind_log_apart(tmp_path, tok):
    """Two pipelines with one aggregation (or two penalties from one shaper) shared a name, and TRL averaged their
    metrics together."""
    funcs = [RewardPipeline([_distinct], name="distinct"), RewardPipeline([_first_token]),
             as_reward_func(build("shaper", "linear", alpha=0.05), tok, name="short"),
             as_reward_func(build("shaper", "linear", alpha=0.5), tok)]
    assert _grpo(tmp_path, tok, funcs).reward_func_names == ["distinct", "rlhf_ext_mean", "short", "shaper_linear"]
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        RewardPipeline([_distinct], name="")


def test_evaluation_leaves_the_pipelines_state_as_training_left_it(tmp_path, tok, tiny_path):
    """GRPO with evaluation every 2 steps: the evaluation's completions went into the running statistics (32 seen
    after 4 steps of 16 training completions) after checkpoint-2 had saved 8 — so a resumed run normalised otherwise
    than the run it continued. Evaluation now scores with the statistics training left, and changes nothing."""

    def run(resume=None):
        pipeline = RewardPipeline([_distinct, _first_token])
        trainer = _grpo(tmp_path, tok, [pipeline], model=tiny_path, max_steps=4, save_strategy="steps", save_steps=2,
                        learning_rate=5e-2, callbacks=[pipeline.callback()], eval_strategy="steps", eval_steps=2,
                        per_device_eval_batch_size=4, eval_dataset=_prompts())
        trainer.train(resume_from_checkpoint=resume)
        return pipeline.state_dict()["members"], {h["step"]: h["rewards/rlhf_ext_mean/mean"]
                                                  for h in trainer.state.log_history
                                                  if "rewards/rlhf_ext_mean/mean" in h and "loss" in h}

    (full, rewards), (resumed, again) = run(), run(str(tmp_path / "checkpoint-2"))
    assert full["_distinct"]["count"] == resumed["_distinct"]["count"] == 16  # training's completions only
    for name in full:
        assert resumed[name] == pytest.approx(full[name])
    assert [again[k] for k in (3, 4)] == pytest.approx([rewards[k] for k in (3, 4)])  # were -0.157 / -0.583


def test_a_batch_every_member_drops_is_left_to_trl(tmp_path, tok):
    """A judge returning None for a whole batch: TRL trains on the other reward function's scores (or leaves the
    samples out); inside a pipeline it raised 'Every sample of the batch got a non-finite reward'."""
    steps = []

    def judge(completion_ids, trainer_state=None, **kw):
        steps.append(trainer_state.global_step)
        return [None] * len(completion_ids) if trainer_state.global_step == 1 else [1.0] * len(completion_ids)

    penalty = as_reward_func(build("shaper", "linear", alpha=0.05, free_tokens=2), tok)
    trainer = _grpo(tmp_path, tok, [RewardPipeline([judge]), penalty], max_steps=3)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.train()
    assert trainer.state.global_step == 3 and 1 in steps


def test_under_trl_the_pipeline_takes_the_trainers_stop_ids_and_chat_template_arguments(tmp_path, tok):
    """Without eos_token_id, shapers inside the pipeline counted no completion as ended (missing_eos charged every
    one) where as_reward_func uses the tokenizer's EOS; and reward models rendered without GRPOConfig's
    chat_template_kwargs. Under TRL the pipeline takes both from the trainer; outside one, it says so once."""
    eos = tok.eos_token_id
    ids = [[5, 6, eos], [5, 6, 7]]
    inside = RewardPipeline([lambda completion_ids, **kw: [0.0] * len(completion_ids)], shapers=["missing_eos"])
    with pytest.warns(UserWarning, match=r"shapers but no eos_token_id.*stop_token_ids"):
        assert inside(completions=["a", "b"], completion_ids=ids) == [-1.0, -1.0]
    seen = {}

    class Member:  # a reward model: gets the chat template's arguments, not the trainer's keywords
        names = ["rm"]
        mean, std = torch.zeros(1), torch.ones(1)

        def score_completions(self, prompts, completions, completion_ids, chat_template_kwargs=None):
            seen["kwargs"] = chat_template_kwargs
            return torch.zeros(len(completion_ids), 1)

    pipeline = RewardPipeline([Member()], shapers=["missing_eos"])
    trainer = _grpo(tmp_path, tok, [pipeline], max_steps=1, chat_template_kwargs={"enable_thinking": False})
    scores = pipeline(completions=["a", "b"], completion_ids=ids, log_metric=trainer._log_metric)  # as TRL calls it
    assert scores == [0.0, -1.0]  # as as_reward_func(missing_eos, tok) charges them
    assert seen["kwargs"] == {"enable_thinking": False}


def test_kl_controller_beta_reaches_the_loggers(tmp_path, tok):
    """Added after the trainer was built (as it must be), the callback ran after report_to's loggers and the console,
    which had already sent the logs on: `kl_controller/beta` reached only state.log_history."""
    from transformers import TrainerCallback

    received = []

    class Logger(TrainerCallback):  # stands for report_to's integrations, registered when the trainer is built
        def on_log(self, args, state, control, logs=None, **kwargs):
            received.append(dict(logs or {}))

    trainer = _grpo(tmp_path, tok, [_distinct], callbacks=[Logger()], max_steps=2)
    trainer.add_callback(KLControllerCallback(build_controller("adaptive", 0.1, 1.0, horizon=10), trainer))
    trainer.train()
    betas = [r["kl_controller/beta"] for r in received if "kl" in r]
    assert len(betas) == 2 and betas[-1] == pytest.approx(trainer.beta)
