"""PEFT configs users bring to PPOTrainer, and sampling settings at their edges: what cannot be trained as intended
is refused or said, a policy that does not start at the reference is named as such (not as a broken training
pass), held-out prompts longer than the training ones stay within the model's positions, and a whitening that
leaves no gradient is said."""

from __future__ import annotations

import warnings

import pytest
from datasets import Dataset
from peft import AdaLoraConfig, IA3Config, LoraConfig

from rlhf_ext.testing import tiny_model_for

from .test_ppo import good_counter, make, prompts

_PPO = dict(per_device_train_batch_size=8, max_steps=1)


def _said(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, " ".join(str(w.message) for w in caught)


def test_a_policy_that_does_not_start_at_the_reference_is_named_as_such_under_a_penalty(tmp_path, tok):
    """init_lora_weights=False (B random): the hard controller refuses it by name; a fixed penalty trains from it
    with that warning. It used to also raise "the training pass and the reference disagree … a module with
    train-only behaviour", blaming the wrong cause."""
    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.testing import tiny_causal_lm

    def build(controller):
        args = PPOConfig(str(tmp_path / controller), kl_controller=controller, kl_target=4.0, use_cpu=True,
                         save_strategy="no", disable_tqdm=True, max_completion_length=6, **_PPO)
        return PPOTrainer(tiny_causal_lm(tok), reward_funcs=good_counter(tok), args=args, train_dataset=prompts(8),
                          processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       init_lora_weights=False))

    with pytest.raises(ValueError, match="does not start at the reference.*hard KL constraint needs"):
        build("hard")
    tr, said = _said(lambda: build("fixed"))
    assert "does not start at the reference" in said and "measured from the base" in said
    assert tr.train()[0]["objective/kl"] > 0


def test_adalora_is_refused_by_name(tmp_path, tok):
    cfg = AdaLoraConfig(init_r=6, target_r=2, target_modules=["q_proj", "v_proj"], total_step=10)
    with pytest.raises(ValueError, match=r"AdaLoraConfig is not supported.*LoraConfig \(e.g. r=6"):
        _ppo_with(tmp_path, tok, cfg)


def _ppo_with(tmp_path, tok, peft_config, **kw):
    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.testing import tiny_causal_lm

    args = PPOConfig(str(tmp_path / "ppo"), kl_controller="fixed", use_cpu=True, save_strategy="no",
                     disable_tqdm=True, max_completion_length=6, **{**_PPO, **kw})
    return PPOTrainer(tiny_causal_lm(tok), reward_funcs=good_counter(tok), args=args, train_dataset=prompts(8),
                      processing_class=tok, peft_config=peft_config)


def test_ia3_trains_and_lora_top_layers_says_it_needs_a_lora_config(tmp_path, tok):
    """IA³ has no layers_to_transform: it was a raw AttributeError at construction."""
    cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    tr = _ppo_with(tmp_path, tok, cfg)
    before = {n: p.detach().clone() for n, p in tr.policy.peft.named_parameters() if "ia3_l" in n}
    tr.train()
    after = dict(tr.policy.peft.named_parameters())
    assert before and all(not after[n].detach().equal(v) for n, v in before.items())
    with pytest.raises(ValueError, match="lora_top_layers=1: IA3Config has no layers_to_transform"):
        _ppo_with(tmp_path / "top", tok, cfg, lora_top_layers=1)


def test_a_lora_bias_setting_that_would_train_the_base_biases_is_said(tmp_path, tok):
    model = tiny_model_for("qwen2.5", tok)  # q/k/v carry biases
    from rlhf_ext import PPOConfig, PPOTrainer

    args = PPOConfig(str(tmp_path / "ppo"), kl_controller="fixed", use_cpu=True, save_strategy="no",
                     disable_tqdm=True, max_completion_length=6, **_PPO)
    tr, said = _said(lambda: PPOTrainer(model, reward_funcs=good_counter(tok), args=args, train_dataset=prompts(8),
                                         processing_class=tok,
                                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="all")))
    assert "peft_config.bias='all': the base model's biases stay frozen" in said
    assert not [n for n, p in tr.policy.peft.named_parameters() if p.requires_grad and "base_layer.bias" in n]


def test_held_out_prompts_longer_than_the_training_ones_stay_within_the_positions(tmp_path, tok):
    """Start-up fits max_completion_length to the training prompts only; a longer held-out prompt sampled past the
    positions (an IndexError on a learned position table). Each evaluation batch is cut to fit, said once."""
    from rlhf_ext.testing import tiny_causal_lm

    model = tiny_causal_lm(tok, max_position_embeddings=48)
    long = Dataset.from_dict({"prompt": [" ".join(["good"] * 40) + " ."] * 4})
    tr = make(tmp_path, tok, model=model, max_completion_length=20, per_device_train_batch_size=8, data=prompts(8),
              stop_on_eos=False)
    out, said = _said(lambda: tr.evaluate_policy(long, batch_size=4))
    prompt_len = len(tok(long[0]["prompt"])["input_ids"])
    assert 0 < out["length_mean"] <= 48 - prompt_len < 20
    assert "their responses are cut at" in said


def test_whitening_a_single_response_token_is_said(tmp_path, tok):
    _, said = _said(lambda: make(tmp_path, tok, per_device_train_batch_size=1, max_completion_length=1,
                                 data=prompts(4)))
    assert "whiten_advantages=True over a batch of one response token" in said
