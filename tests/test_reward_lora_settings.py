"""Every LoRA setting a reward model trains with is one its artifact rebuilds: `load_reward_model` scores as the
trained model did, alone and hosted on a policy's base (as PPO loads it), and never edits that shared base. A setting
the artifact cannot rebuild is refused when the trainer starts, not after training."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer, load_reward_model
from rlhf_ext.adapters import wrap_with_peft
from rlhf_ext.models import load_model

from .conftest import preference_rows

QV = ["q_proj", "v_proj"]


def _trainer(tmp_path, tiny_path, tok, peft_config, mode="heads", K=1, steps=2):
    args = RewardEnsembleConfig(str(tmp_path / "rm"), max_steps=steps, per_device_train_batch_size=8,
                                learning_rate=1e-2, normalization_samples=8, report_to="none", save_strategy="no",
                                eval_strategy="no", use_cpu=True, disable_tqdm=True, ensemble_mode=mode,
                                ensemble_size=K)
    return RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                                 processing_class=tok, peft_config=peft_config)


def _policy(tiny_path):
    return wrap_with_peft(load_model(tiny_path, "causal"), LoraConfig(r=4, target_modules=QV), "policy")


def _base_weights(peft_model) -> dict:
    """The host's own weights, by their name before any adapter wrapped their module."""
    return {n.replace(".base_layer", "").replace(".original_module", ""): p.detach().clone()
            for n, p in peft_model.get_base_model().named_parameters()
            if "lora_" not in n and "modules_to_save" not in n}


SETTINGS = {
    "modules_to_save": dict(modules_to_save=["embed_tokens"]),
    "rank_pattern": dict(rank_pattern={"q_proj": 2}),
    "alpha_pattern": dict(alpha_pattern={"v_proj": 64}),
    "lora_bias": dict(lora_bias=True),
    "use_dora": dict(use_dora=True),
    "use_rslora": dict(use_rslora=True),
    "layers_to_transform": dict(layers_to_transform=[1]),
    "exclude_modules": dict(target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=["o_proj"]),
    "regex_target_modules": dict(target_modules=r".*\.(q_proj|v_proj)$"),
}


@pytest.mark.parametrize("mode,K", [("heads", 1), ("adapters", 2)])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_an_artifact_rebuilds_the_adapter_it_was_trained_with(tmp_path, tiny_path, tok, setting, mode, K):
    cfg = dict(r=4, target_modules=QV, **SETTINGS[setting]) if "target_modules" not in SETTINGS[setting] \
        else dict(r=4, **SETTINGS[setting])
    tr = _trainer(tmp_path, tiny_path, tok, LoraConfig(**cfg), mode, K)
    tr.train()  # "adapters" mode with DoRA: the post-training normalisation pass scores without a mixed batch
    tr.save_model(str(tmp_path / "art"))
    rows = Dataset.from_list(preference_rows(6, 1))
    trained = tr.model.score_texts(rows["prompt"], rows["chosen"])
    alone = load_reward_model(tmp_path / "art").score_texts(rows["prompt"], rows["chosen"])
    assert torch.allclose(alone, trained, atol=1e-5), (alone - trained).abs().max()
    policy = _policy(tiny_path)
    before = _base_weights(policy)
    hosted = load_reward_model(tmp_path / "art", base_model=policy, adapter_prefix="rm_")
    assert torch.allclose(hosted.score_texts(rows["prompt"], rows["chosen"]), trained, atol=1e-5)
    after = _base_weights(policy)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert policy.active_adapter == "policy"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_init_that_edits_the_base_weights_is_refused_at_start_up(tmp_path, tiny_path, tok, init):
    # PiSSA/OLoRA move part of the base weights into the adapter: the saved adapter on the unmodified (shared) base
    # does not reproduce the trained model, and rebuilding it with that init rewrites the host's base in place
    with pytest.raises(ValueError, match=f"init_lora_weights={init!r}.*default"):
        _trainer(tmp_path, tiny_path, tok, LoraConfig(r=4, target_modules=QV, init_lora_weights=init))


def test_attaching_an_artifact_never_reruns_a_base_editing_init_on_the_host(tmp_path, tiny_path, tok):
    """An artifact recording init_lora_weights='pissa' (as earlier versions trained and wrote them) is refused with
    the fix before anything on the host changes; one recording a harmless init is rebuilt with the default init."""
    tr = _trainer(tmp_path, tiny_path, tok, LoraConfig(r=4, target_modules=QV, init_lora_weights="gaussian"))
    tr.train()
    tr.save_model(str(tmp_path / "art"))
    rows = Dataset.from_list(preference_rows(6, 1))
    trained = tr.model.score_texts(rows["prompt"], rows["chosen"])
    policy = _policy(tiny_path)
    before = _base_weights(policy)
    hosted = load_reward_model(tmp_path / "art", base_model=policy, adapter_prefix="rm_")
    assert torch.allclose(hosted.score_texts(rows["prompt"], rows["chosen"]), trained, atol=1e-5)
    spec_file = tmp_path / "art" / "rlhf_ext_reward.json"
    spec = json.loads(spec_file.read_text())
    spec["lora_config"]["init_lora_weights"] = "pissa"
    spec_file.write_text(json.dumps(spec))
    (tmp_path / "art" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*retrain"):
        load_reward_model(tmp_path / "art", base_model=policy, adapter_prefix="rm2_")
    after = _base_weights(policy)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert "rm2_reward" not in policy.peft_config


def test_adalora_is_refused_at_start_up(tmp_path, tiny_path, tok):
    from peft import AdaLoraConfig

    with pytest.raises(ValueError, match="AdaLoraConfig.*update_and_allocate.*LoraConfig"):
        _trainer(tmp_path, tiny_path, tok, AdaLoraConfig(target_modules=QV, total_step=10), "adapters", 2)


def test_a_lora_setting_the_artifact_cannot_rebuild_is_refused_at_start_up(tmp_path, tiny_path, tok):
    with pytest.raises(ValueError, match="layer_replication"):
        _trainer(tmp_path, tiny_path, tok, LoraConfig(r=4, target_modules=QV, layer_replication=[[0, 2], [1, 2]]))


def test_bias_all_is_said_and_not_recorded_as_training_the_base_biases(tmp_path, tiny_path, tok):
    with pytest.warns(UserWarning, match="bias='all'.*stay frozen"):
        tr = _trainer(tmp_path, tiny_path, tok, LoraConfig(r=4, target_modules=QV, bias="all"))
    assert tr.lora_config["bias"] == "none"  # a host's base biases are not made trainable when it is attached
