"""Gradient (activation) checkpointing: training with it on computes what training without it computes.

Reward trainer: heads and adapters ensembles with LoRA, a full (no LoRA) trunk, a 4-bit base, reentrant and
non-reentrant checkpointing, with and without the frozen-prefix cache. Each run is compared with the same run
without checkpointing (same seed: per-step losses and final parameters match), and the LoRA matrices of layer 0 —
below the top layer, so their gradient crosses a checkpointed layer boundary — must have trained.
"""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.models import load_model

from .conftest import preference_rows

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _reward_run(tmp_path, path, tok, mode, peft, checkpointing, reentrant=None, four_bit=False, **kw):
    torch.manual_seed(0)
    args = dict(ensemble_size=2, ensemble_mode=mode, max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                report_to="none", save_strategy="no", eval_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_steps=1, normalization_samples=8, seed=0, gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs=None if reentrant is None else {"use_reentrant": reentrant})
    args.update(kw)
    model = load_model(path, "causal", load_in_4bit=True) if four_bit else path
    tr = RewardEnsembleTrainer(model, args=RewardEnsembleConfig(str(tmp_path / "rm"), **args),
                               train_dataset=Dataset.from_list(preference_rows(24, 0)), processing_class=tok,
                               peft_config=LoraConfig(**LORA) if peft else None)
    losses = []
    compute_loss = tr.compute_loss

    def recording(*a, **k):
        loss = compute_loss(*a, **k)
        if tr.model.training:
            losses.append(float(loss))
        return loss

    tr.compute_loss = recording
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    tr.train()
    after = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    return tr, losses, before, after


_BASELINES = {}


def _baseline(tmp_path, path, tok, mode, peft, four_bit, **kw):
    key = (path, mode, peft, four_bit, tuple(sorted(kw.items())))
    if key not in _BASELINES:
        _, losses, _, after = _reward_run(tmp_path / "base", path, tok, mode, peft, False, four_bit=four_bit, **kw)
        _BASELINES[key] = losses, after
    return _BASELINES[key]


def _layer0(params: dict) -> dict:
    return {n: p for n, p in params.items() if ".layers.0." in n and "lora_" in n}


@pytest.mark.parametrize("mode,peft,four_bit,reentrant", [
    ("heads", True, False, False), ("heads", True, False, True),
    ("adapters", True, False, False), ("adapters", True, False, True),
    ("adapters", True, True, False), ("heads", True, True, True),
    ("heads", False, False, True),
])
def test_reward_trainer_checkpointing_matches_plain_training(tmp_path, tok, tiny_path, tiny4_path, mode, peft,
                                                             four_bit, reentrant):
    path = tiny4_path if four_bit else tiny_path
    tr, losses, before, after = _reward_run(tmp_path, path, tok, mode, peft, True, reentrant, four_bit)
    ens = tr.accelerator.unwrap_model(tr.model)
    assert ens.is_gradient_checkpointing and ens.is_activation_checkpointing
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    if peft:
        lower = _layer0(after)
        assert lower and len(lower) == 4 * (2 if mode == "adapters" else 1)  # q, v × A, B × adapters
        for n, p in lower.items():
            assert not torch.equal(p, before[n]), f"{n} did not train"
    else:
        assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"],
                               before["model.layers.0.self_attn.q_proj.weight"])
    ref_losses, ref_after = _baseline(tmp_path, path, tok, mode, peft, four_bit)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert ref_after.keys() == after.keys()
    for n in after:
        assert torch.allclose(after[n], ref_after[n], atol=1e-5), n
    tr.model.gradient_checkpointing_disable()
    assert not ens.is_gradient_checkpointing


def test_trainer_keyword_arguments_reach_the_trunk(tmp_path, tok, tiny_path):
    """transformers' Trainer passes `every_n_layers` / `offload` (and may pass more): forwarded to the trunk."""
    from rlhf_ext.models import trunk_of

    tr, losses, before, after = _reward_run(tmp_path, tiny_path, tok, "adapters", True, True, False,
                                            gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                           "every_n_layers": 2})
    layers = trunk_of(tr.model.model).layers
    assert [bool(layer.gradient_checkpointing) for layer in layers] == [True, False]
    ens = tr.model
    ens.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True}, every_n_layers=1,
                                      offload=False)
    assert all(layer.gradient_checkpointing for layer in layers)
    ens.activation_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in layers)
    ens.activation_checkpointing_enable({"use_reentrant": False})  # enabling twice wraps the layers once
    ens.activation_checkpointing_enable({"use_reentrant": False})
    fn = layers[0]._gradient_checkpointing_func
    assert getattr(fn, "__wrapped_checkpoint__", None) is not None
    assert not hasattr(fn.__wrapped_checkpoint__, "__wrapped_checkpoint__")


@pytest.mark.parametrize("reentrant", [False, True])
def test_reward_checkpointing_with_frozen_prefix_cache(tmp_path, tok, reentrant):
    """LoRA on the top layer only, lower layers cached: with reentrant checkpointing the cached state needs no
    gradient, and the adapters above it must still train."""
    from rlhf_ext.testing import save_tiny_model

    path = save_tiny_model(tmp_path / "deep", tok, num_layers=3)
    kw = dict(lora_top_layers=1, cache_frozen_layers=True, num_train_epochs=2, max_steps=6)
    tr, losses, before, after = _reward_run(tmp_path, path, tok, "adapters", True, True, reentrant, **kw)
    assert tr.prefix_cache is not None and tr.prefix_cache.store
    ref_losses, ref_after = _baseline(tmp_path, path, tok, "adapters", True, False, **kw)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    for n in after:
        assert torch.allclose(after[n], ref_after[n], atol=1e-5), n
        if "lora_" in n:
            assert not torch.equal(after[n], before[n]), n


# ------------------------------------------------------------------------------------------------------ PPO
def _ppo_run(tmp_path, tok, model, checkpointing, reentrant=None, critic="shared"):
    from rlhf_ext import PPOConfig, PPOTrainer

    from .test_ppo import good_counter, prompts

    torch.manual_seed(0)
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=2, learning_rate=3e-2,
                     max_completion_length=6, kl_controller="fixed", init_kl_coef=0.01, use_cpu=True,
                     save_strategy="no", disable_tqdm=True, logging_steps=1000, seed=0, critic=critic,
                     gradient_checkpointing=checkpointing,
                     share_prompt_prefix=False,  # the plain run takes the full pass, as checkpointing does
                     gradient_checkpointing_kwargs=None if reentrant is None else {"use_reentrant": reentrant})
    tr = PPOTrainer(model(), reward_funcs=good_counter(tok), args=args, train_dataset=prompts(), processing_class=tok,
                    peft_config=LoraConfig(**LORA))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    hist = tr.train()
    after = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    return hist, before, after


@pytest.mark.parametrize("four_bit,reentrant,critic", [
    (False, False, "shared"), (False, True, "shared"), (True, False, "shared"), (True, True, "shared"),
    (False, False, "separate"), (True, True, "separate"),
])
def test_ppo_checkpointing_matches_plain_training(tmp_path, tok, tiny4_path, four_bit, reentrant, critic):
    from rlhf_ext.testing import tiny_causal_lm

    def model():
        return load_model(tiny4_path, "causal", load_in_4bit=True) if four_bit else tiny_causal_lm(tok)

    hist, before, after = _ppo_run(tmp_path, tok, model, True, reentrant, critic)
    assert all(math.isfinite(h["loss/policy"]) and math.isfinite(h["loss/value"]) for h in hist)
    lower = _layer0(after)
    assert len(lower) == 4 * (2 if critic == "separate" else 1)
    for n in lower:
        assert not torch.equal(after[n], before[n]), f"{n} did not train"
    ref_hist, _, ref_after = _ppo_run(tmp_path / "plain", tok, model, False, critic=critic)
    for n in after:
        assert torch.allclose(after[n], ref_after[n], atol=1e-5), n
    for key in ("loss/policy", "loss/value"):
        assert hist[-1][key] == pytest.approx(ref_hist[-1][key], rel=1e-4, abs=1e-6)


def test_reward_config_checkpointing_off_by_default_without_a_deprecation_warning(tmp_path, recwarn):
    """TRL's RewardConfig turns the deprecated `gradient_checkpointing` on, so every config printed transformers'
    "`gradient_checkpointing` is deprecated" warning, asked for or not. Ours: off and silent by default; the old name
    still works (and warns, as transformers does); the new name works without a warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = RewardEnsembleConfig(str(tmp_path), use_cpu=True)
        new = RewardEnsembleConfig(str(tmp_path), use_cpu=True, activation_checkpointing=True)
    assert default.activation_checkpointing is False and default.gradient_checkpointing is False
    assert new.activation_checkpointing is True and new.gradient_checkpointing is True
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        old = RewardEnsembleConfig(str(tmp_path), use_cpu=True, gradient_checkpointing=True)
    assert old.activation_checkpointing is True


@pytest.mark.parametrize("recipe", ["reward_7b_qlora", "ppo_7b_qlora"])
def test_7b_recipes_turn_checkpointing_on_under_its_current_name(recipe, recwarn):
    from pathlib import Path

    import yaml

    from trl import ModelConfig, ScriptArguments, TrlParser

    from rlhf_ext import PPOConfig

    path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / f"{recipe}.yaml"
    config = RewardEnsembleConfig if recipe.startswith("reward") else PPOConfig
    parser = TrlParser((ScriptArguments, config, ModelConfig))
    cfg = yaml.safe_load(path.read_text())
    args = parser.parse_dict({**cfg, "use_cpu": True, "bf16": False})[1]
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True  # what the trainers read
    assert not [w for w in recwarn if "gradient_checkpointing` is deprecated" in str(w.message)]


def test_ppo_takes_every_n_layers_as_trainer_does(tmp_path, tok, tiny4_path):
    """`every_n_layers` (and `offload`) in the checkpointing kwargs are `activation_checkpointing_enable`'s own
    arguments, which Trainer.train pops before the rest goes to torch.utils.checkpoint; PPOTrainer enables
    checkpointing itself and handed them to torch, which passed them on to the layers: every layer was checkpointed."""
    from rlhf_ext import PPOConfig, PPOTrainer

    from .test_ppo import good_counter, prompts

    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=1, max_completion_length=4,
                     use_cpu=True, save_strategy="no", disable_tqdm=True, monitor=False, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": 2})
    tr = PPOTrainer(tiny4_path, reward_funcs=good_counter(tok), args=args, train_dataset=prompts(),
                    processing_class=tok, peft_config=LoraConfig(**LORA))
    layers = tr.policy.peft.get_base_model().model.layers
    assert [m.gradient_checkpointing for m in layers] == [i % 2 == 0 for i in range(len(layers))]
    assert args.gradient_checkpointing_kwargs["every_n_layers"] == 2  # the user's config is left as given
