"""The transformers TrainingArguments a user brings to PPOConfig are honoured — checkpoint, logging and evaluation
cadence, `save_total_limit`, `weight_decay` — or refused with the fix; train() returns what Trainer scripts read."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from rlhf_ext import PPOConfig
from rlhf_ext.ppo.checkpoint import newest_complete_checkpoint, rotate_checkpoints

from .test_ppo import make, prompts


def _checkpoints(tmp_path):
    return sorted(int(p.name.split("-")[1]) for p in (tmp_path / "ppo").glob("checkpoint-*"))


def test_save_strategy_epoch_checkpoints_after_each_pass_over_the_prompts(tmp_path, tok):
    """32 prompts, 16 per iteration: a pass ends every 2 iterations, and the run's end closes the last, partial one
    (as transformers' Trainer: on_epoch_end after max_steps). It used to write no checkpoint at all."""
    make(tmp_path, tok, max_steps=5, save_strategy="epoch").train()
    assert _checkpoints(tmp_path) == [2, 4, 5]


def test_save_total_limit_keeps_the_newest_and_never_another_runs(tmp_path, tok):
    """save_total_limit=2 keeps the two newest of this run (it used to keep every one); a folder left by another
    run in the same output_dir is not this run's to delete: a new run there is refused before it writes anything
    (`test_rotate_checkpoints`: rotation never touches a higher-numbered folder either)."""
    other = tmp_path / "other" / "ppo" / "checkpoint-9"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("another run")
    with pytest.raises(ValueError, match="holds an earlier run \\(checkpoint-9\\)"):
        make(tmp_path / "other", tok, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2).train()
    assert (other / "notes.txt").read_text() == "another run" and _checkpoints(tmp_path / "other") == [9]
    make(tmp_path, tok, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2).train()
    assert _checkpoints(tmp_path) == [3, 4]
    assert newest_complete_checkpoint(tmp_path / "ppo").endswith("checkpoint-4")  # what is kept still resumes


@pytest.mark.parametrize("existing, newest, limit, kept", [
    ([1, 2, 3, 4], 4, 2, [3, 4]),
    ([1, 2, 3, 4], 4, 1, [4]),
    ([1, 2, 3, 4], 4, None, [1, 2, 3, 4]),
    ([2, 4, 6, 8, 10], 6, 2, [4, 6, 8, 10]),  # 8 and 10: another run's, above the one just written
    ([5], 5, 3, [5]),
])
def test_rotate_checkpoints(tmp_path, existing, newest, limit, kept):
    for n in existing:
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()  # not numbered: never a candidate
    removed = rotate_checkpoints(tmp_path, newest, limit)
    left = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*") if p.name[11:].isdigit())
    assert left == kept and len(removed) == len(existing) - len(kept)
    assert (tmp_path / "checkpoint-final").is_dir()


def _train_metrics(tr):
    return [h for h in tr.state.log_history if "objective/scores" in h]


def test_logging_strategy_and_first_step(tmp_path, tok):
    """logging_strategy='no' used to log every iteration anyway."""
    tr = make(tmp_path / "a", tok, max_steps=4, logging_strategy="no", logging_steps=1)
    tr.train()
    assert _train_metrics(tr) == []
    tr = make(tmp_path / "b", tok, max_steps=4, logging_strategy="epoch")
    tr.train()
    assert [h["step"] for h in _train_metrics(tr)] == [2, 4]
    tr = make(tmp_path / "c", tok, max_steps=3, logging_steps=2, logging_first_step=True)
    tr.train()
    assert [h["step"] for h in _train_metrics(tr)] == [1, 2]


def test_eval_strategy_evaluates_without_changing_the_run(tmp_path, tok):
    """eval_strategy='steps' samples the policy on eval_dataset and logs eval_* (it used to refuse: the dataset never
    reached transformers' check). At the start the policy is the reference, so the exact KL is 0; evaluating draws
    on a forked RNG, so the training run is the same one, number for number, as without evaluation."""
    plain = make(tmp_path / "plain", tok, max_steps=4).train()
    tr = make(tmp_path / "eval", tok, max_steps=4, eval_strategy="steps", eval_steps=2, eval_on_start=True,
              eval_dataset=prompts(6))
    hist = tr.train()
    evals = [h for h in tr.state.log_history if "eval_kl" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]
    assert evals[0]["eval_kl"] == 0.0 and all(h["eval_kl"] > 0 for h in evals[1:])
    assert all(0 < h["eval_length"] <= 8 and 0 <= h["eval_eos"] <= 1 for h in evals)
    for key in ("objective/scores", "loss/policy", "objective/kl"):
        assert [h[key] for h in hist] == [h[key] for h in plain], key
    assert set(tr.evaluate()) == {"eval_kl", "eval_length", "eval_eos"}


def test_evaluate_without_a_dataset_says_what_to_pass(tmp_path, tok):
    with pytest.raises(ValueError, match=r"No eval_dataset: pass one to PPOTrainer\(eval_dataset=\.\.\.\)"):
        make(tmp_path, tok, max_steps=1).evaluate()


def test_bad_eval_dataset_is_refused_at_start(tmp_path, tok):
    """Not at the first evaluation, hours into the run."""
    with pytest.raises(ValueError, match="prompt"):
        make(tmp_path, tok, max_steps=1, eval_dataset=Dataset.from_dict({"text": ["a", "b"]}))


@pytest.mark.parametrize("kw, match", [
    ({"torch_compile": True}, r"torch_compile is not supported.*Remove torch_compile"),
    ({"torch_compile_backend": "inductor"}, r"torch_compile is not supported"),
    ({"neftune_noise_alpha": 5.0}, r"neftune_noise_alpha=5.0.*Remove neftune_noise_alpha"),
    ({"label_smoothing_factor": 0.1}, r"label_smoothing_factor=0.1: .*PPO's loss has no labels. Remove it"),
    ({"auto_find_batch_size": True}, r"auto_find_batch_size.*rlhf-ext plan"),
    ({"save_strategy": "best", "metric_for_best_model": "loss"}, r"save_strategy='best'.*save_total_limit"),
    ({"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "steps"}, r"load_best_model_at_end"),
])
def test_training_arguments_ppo_cannot_honour_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(str(tmp_path / "ppo"), use_cpu=True, **kw)


def test_data_seed_sets_the_prompt_order_as_transformers_sampler(tmp_path, tok):
    """`data_seed` orders the prompts (it was ignored: the order came from `seed`); unset, `seed` does."""
    def order(**kw):
        tr = make(tmp_path / str(kw), tok, max_steps=1, **kw)
        return [p for _ in range(4) for p, _ in tr._next_prompts()]

    assert order(seed=0) == order(seed=0, data_seed=0)
    assert order(seed=0, data_seed=7) == order(seed=1, data_seed=7) != order(seed=0)


def test_save_only_model_warns_and_checkpoints_still_resume(tmp_path, tok):
    """save_only_model is not silently half-honoured: a warning says PPO checkpoints keep what resuming needs, and
    they do (the optimizer state is there, and a second run resumes from it)."""
    with pytest.warns(UserWarning, match=r"save_only_model=True: PPO checkpoints still hold the optimizer"):
        tr = make(tmp_path, tok, max_steps=1, save_only_model=True, save_strategy="steps", save_steps=1)
    tr.train()
    ck = tmp_path / "ppo" / "checkpoint-1"
    assert any("optimizer" in p.name for p in ck.iterdir()), sorted(p.name for p in ck.iterdir())
    with pytest.warns(UserWarning, match="save_only_model"):
        again = make(tmp_path, tok, max_steps=2, save_only_model=True)
    again.train(resume_from_checkpoint=str(ck))
    assert again.iteration == 2


def _one_step(tmp_path, tok, weight_decay):
    tr = make(tmp_path, tok, max_steps=1, num_ppo_epochs=1, learning_rate=1e-2, weight_decay=weight_decay)
    with torch.no_grad():
        tr.policy.value_head.bias.fill_(0.5)  # non-zero, so decay on it would show
    start = {n: p.detach().clone() for n, p in _trained(tr)}
    tr.train()
    return start, {n: p.detach().clone() for n, p in _trained(tr)}


def _trained(tr):
    return [(n, p) for n, p in tr.policy.peft.named_parameters() if p.requires_grad] + \
        [(f"value_head.{n}", p) for n, p in tr.policy.value_head.named_parameters()]


def test_weight_decay_is_the_configs_on_matrices_only(tmp_path, tok):
    """One optimizer step from the same parameters and the same gradients: AdamW's decoupled decay makes the run
    without decay and the run with it differ by exactly lr·wd·θ₀ on every matrix, and not at all on the bias. (The
    config's weight_decay used to be dropped: torch's AdamW decayed everything by 0.01, 0.0 in the config or not.)"""
    start, plain = _one_step(tmp_path / "plain", tok, 0.0)
    start2, decayed = _one_step(tmp_path / "decayed", tok, 0.3)
    lr, wd = 1e-2, 0.3
    assert all(torch.equal(start[n], start2[n]) for n in start)
    matrices = [n for n in start if start[n].ndim >= 2]
    assert any("lora_A" in n for n in matrices) and "value_head.weight" in matrices
    for n in start:
        expected = lr * wd * start[n] if start[n].ndim >= 2 else torch.zeros_like(start[n])
        torch.testing.assert_close(plain[n] - decayed[n], expected, rtol=1e-3, atol=1e-7, msg=n)
    assert any(float((plain[n] - decayed[n]).abs().max()) > 1e-5 for n in matrices)


def test_train_returns_what_trainer_scripts_read(tmp_path, tok):
    """transformers' example scripts read `train_result.metrics` and save them with the state; train() returns the
    iterations' metrics (a list, as before) with TrainOutput's fields beside them."""
    tr = make(tmp_path, tok, max_steps=3)
    out = tr.train()
    assert len(out) == 3 and out.global_step == 3 and all("objective/scores" in h for h in out)
    objective = [h["loss/policy"] + tr.args.vf_coef * h["loss/value"] for h in out]
    assert out.training_loss == pytest.approx(sum(objective) / 3) and out.metrics["train_loss"] == out.training_loss
    m = out.metrics
    assert m["train_samples_per_second"] == pytest.approx(3 * 16 / m["train_runtime"], rel=1e-2)
    assert m["train_steps_per_second"] == pytest.approx(3 / m["train_runtime"], rel=1e-2)
    tr.log_metrics("train", m)
    tr.save_metrics("train", m)
    tr.save_state()
    saved = json.loads((tmp_path / "ppo" / "train_results.json").read_text())
    assert saved["train_loss"] == pytest.approx(out.training_loss)
    assert json.loads((tmp_path / "ppo" / "trainer_state.json").read_text())["global_step"] == 3


@pytest.mark.parametrize("kw, fix", [
    ({"beta": 0.04}, r"`beta` \(GRPO / RLOO\) → the KL settings: kl_controller='fixed' with init_kl_coef=β"),
    ({"num_generations": 8}, r"`num_generations` \(GRPO / RLOO\) → nothing: PPO samples one response per prompt"),
    ({"epsilon": 0.2}, r"`epsilon` \(GRPO / RLOO\) → clip_range"),
    ({"reward_weights": [1.0, 0.5]}, r"aggregation='weighted'"),
    ({"vllm_mode": "colocate"}, r"`vllm_mode` \(GRPO / RLOO\) → nothing: sampling runs through the policy's own generate\(\)"),
])
def test_grpo_and_rloo_fields_are_refused_with_the_ppo_name(tmp_path, kw, fix):
    """A script switching from GRPOConfig / RLOOConfig gets what PPOConfig calls it, not a bare TypeError."""
    with pytest.raises(TypeError, match=fix):
        PPOConfig(str(tmp_path / "ppo"), use_cpu=True, **kw)


@pytest.mark.parametrize("trl_config", ["GRPOConfig", "RLOOConfig"])
def test_every_field_of_trls_online_configs_is_ppos_or_refused_by_name(tmp_path, trl_config):
    """Read from the installed TRL's own dataclasses, so a field a new TRL adds is caught here: each is a PPOConfig
    field (same meaning) or refused naming what to use instead — none ends in a bare 'unexpected keyword'."""
    import dataclasses

    import trl

    from rlhf_ext.ppo.config import foreign_field_fixes

    ours = {f.name for f in dataclasses.fields(PPOConfig)}
    theirs = {f.name for f in dataclasses.fields(getattr(trl, trl_config)) if f.init} - ours
    assert [k for k in sorted(theirs) if foreign_field_fixes([k]) is None] == []
    with pytest.raises(TypeError, match=r"`top_entropy_quantile` \(GRPO / RLOO\) → nothing: every response token"):
        PPOConfig(str(tmp_path / "ppo"), use_cpu=True, top_entropy_quantile=0.2)


def test_every_refused_grpo_field_is_in_the_readme_table():
    from pathlib import Path

    from rlhf_ext.ppo.config import FROM_GRPO_RLOO

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### Coming from GRPO / RLOO")[1].split("###")[0]
    assert [k for k in FROM_GRPO_RLOO if f"`{k}`" not in table] == []


def test_chat_template_kwargs_reach_the_prompts_template_and_shuffle_dataset_false_keeps_the_order(tmp_path, tok):
    """GRPO / RLOO's `chat_template_kwargs` (Qwen3's enable_thinking, say) reach `apply_chat_template` for the
    prompts; `shuffle_dataset=False` gives the prompts in dataset order. Both were unexpected keywords."""
    import copy

    thinking = copy.deepcopy(tok)
    thinking.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                              "{% if enable_thinking is defined and not enable_thinking %}<|endoftext|>{% endif %}")
    first = {}
    for name, kw in (("plain", {}), ("no_thinking", {"chat_template_kwargs": {"enable_thinking": False}})):
        args = PPOConfig(str(tmp_path / name), use_cpu=True, per_device_train_batch_size=4, max_steps=1, **kw)
        tr = trainer_for(thinking, args)
        first[name] = tr.prompts[0][1]
    assert first["no_thinking"] == first["plain"] + thinking.convert_tokens_to_ids(["<|endoftext|>"])

    in_order = trainer_for(tok, PPOConfig(str(tmp_path / "o"), use_cpu=True, per_device_train_batch_size=4,
                                             max_steps=1, shuffle_dataset=False))
    assert [p for _ in range(2) for p, _ in in_order._next_prompts()] == [p for p, _ in in_order.prompts[:8]]


def trainer_for(tokenizer, args):
    from peft import LoraConfig

    from rlhf_ext import PPOTrainer
    from rlhf_ext.testing import tiny_causal_lm

    return PPOTrainer(tiny_causal_lm(tokenizer), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                      args=args, train_dataset=prompts(), processing_class=tokenizer,
                      peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
