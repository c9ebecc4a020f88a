"""Where two PPO options meet (found by a pairwise covering array over PPOConfig's options): a separate critic with a
zero value head, lora_top_layers beside a PeftModel or a LoraConfig's own layers."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer
from rlhf_ext.testing import tiny_causal_lm

DATA = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"write a short review of the {w} ."}]
                                     for w in "movie book song film food place day night".split() * 4]})


def _make(tmp_path, tok, **kw):
    model = tiny_causal_lm(tok, hidden_size=64, tie_word_embeddings=False)
    with torch.no_grad():  # one residual dimension of constant size (real LLMs' outlier features): V moves as one
        model.model.embed_tokens.weight[:, 0] = 3.0
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=2, num_ppo_epochs=8,
                     max_completion_length=8, kl_controller="fixed", learning_rate=3e-2, use_cpu=True,
                     save_strategy="no", disable_tqdm=True, monitor=False, critic="separate", **kw)
    return PPOTrainer(model, reward_funcs=lambda completions, **k: [-5.0] * len(completions), args=args,
                      train_dataset=DATA, processing_class=tok,
                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_a_zero_value_head_and_a_saturated_value_clip_are_not_a_dead_critic(tmp_path, tok):
    """critic='separate' + value_head_init='zeros': at step 1 the critic adapter's gradient is exactly 0 (the head's
    weight is 0); Adam's first step then moves V past clip_range_value on every token, so the value loss has no
    gradient for the rest of iteration 1 (8 steps here). The reach check took that for a detached graph."""
    tr = _make(tmp_path, tok, value_head_init="zeros")
    before = {n: p.detach().clone() for n, p in tr.policy.peft.named_parameters() if "lora_B.critic" in n}
    tr.train()
    assert all(not torch.equal(p, before[n]) for n, p in tr.policy.peft.named_parameters() if n in before)


def test_a_detached_critic_path_is_still_named(tmp_path, tok):
    tr = _make(tmp_path, tok)
    layer = tr.policy.peft.get_base_model().model.layers[0].self_attn.v_proj
    layer.register_forward_hook(lambda m, i, o: o.detach() if m.active_adapters == ["critic"] else o)
    with pytest.raises(RuntimeError, match=r"received no gradient at the first optimizer step.*layers\.0\.self_attn\.v_proj\.lora_B\.critic"):
        tr.train()


def test_lora_top_layers_is_refused_where_it_would_do_nothing_or_be_overridden(tmp_path, tok):
    """With a PeftModel, lora_top_layers was silently ignored (LoRA stayed on every layer, no frozen-prefix cache);
    beside a LoraConfig naming other layers_to_transform, it silently replaced them."""
    from peft import get_peft_model

    reward = lambda completions, **k: [1.0] * len(completions)  # noqa: E731
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1, use_cpu=True,
                     save_strategy="no", disable_tqdm=True, monitor=False, lora_top_layers=1)
    peft_model = get_peft_model(tiny_causal_lm(tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="lora_top_layers=1 .* already a PeftModel"):
        PPOTrainer(peft_model, reward_funcs=reward, args=args, train_dataset=DATA, processing_class=tok)
    with pytest.raises(ValueError, match=r"lora_top_layers=1 \(LoRA on layers \[1\]\) and the LoRA config's "
                                         r"layers_to_transform=\[0\] disagree"):
        PPOTrainer(tiny_causal_lm(tok), reward_funcs=reward, args=args, train_dataset=DATA, processing_class=tok,
                   peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0]))
    tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=reward, args=args, train_dataset=DATA, processing_class=tok,
                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert tr.policy.split is not None  # the same layers both ways: accepted, the frozen-prefix cache on


def test_a_length_shaper_whose_budget_is_past_the_completion_cap_is_named(tmp_path, tok):
    """overlong's default max_length=48 (cache 16) beside max_completion_length=8 charged nothing, ever, without a
    word; so did linear with free_tokens past the cap. One that can charge says nothing."""
    import warnings

    from .test_ppo import make

    with pytest.warns(UserWarning, match=r"'overlong' shaper can never charge.*max_length - cache_length = 32.*"
                                         r"set max_length=8"):
        make(tmp_path / "a", tok, shapers=["overlong"])
    with pytest.warns(UserWarning, match=r"'linear' shaper can never charge.*free_tokens=8"):
        make(tmp_path / "b", tok, shapers=[{"name": "linear", "free_tokens": 8}])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*shaper can never charge")
        make(tmp_path / "c", tok, shapers=[{"name": "overlong", "max_length": 8, "cache_length": 4},
                                           {"name": "linear", "free_tokens": 7}, "target"])
