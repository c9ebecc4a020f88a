"""Our ensembles, shapers and KL controllers inside TRL's own GRPOTrainer / RLOOTrainer."""

import pytest
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
