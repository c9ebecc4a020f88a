"""Paths as users type them: `~` is expanded wherever a local path is read — as transformers' TrainingArguments
expands output_dir and rlhf_ext's load_model / the recipes' checks expand model and reward paths. A reward model,
checkpoint or dataset given as `~/…` (a YAML value, which no shell expands) passed the recipes' checks and was then
refused as "not a reward model" / "no such folder" though it was there."""
from __future__ import annotations

import json

import pytest
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer, load_reward_model
from rlhf_ext.data import load_split, resolve_data_path
from rlhf_ext.integrity import resume_folder

from .conftest import preference_rows


@pytest.fixture
def home(tmp_path, monkeypatch):
    folder = tmp_path / "home é"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    return folder


def test_a_reward_model_under_tilde_loads_and_hosts_ppo(home, tmp_path, tiny_path, tok):
    args = RewardEnsembleConfig(str(home / "rm 日本"), ensemble_size=2, ensemble_mode="adapters", max_steps=1,
                                per_device_train_batch_size=8, report_to="none", save_strategy="no", use_cpu=True,
                                disable_tqdm=True, normalization_samples=8)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    rm = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               processing_class=tok, peft_config=lora)
    rm.train()
    rm.save_model()
    assert load_reward_model("~/rm 日本/").names == ["member_0", "member_1"]
    ppo = PPOTrainer(tiny_path, reward_funcs="~/rm 日本", processing_class=tok, peft_config=lora,
                     args=PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1,
                                    max_completion_length=4, use_cpu=True, save_strategy="no", monitor=False),
                     train_dataset=Dataset.from_dict({"prompt": ["hello there ."] * 4}))
    assert ppo.rewards.member_names
    with pytest.raises(FileNotFoundError, match="No reward model at .*no such folder"):
        load_reward_model(str(tmp_path / "not there"))


def test_a_checkpoint_and_a_dataset_under_tilde_are_found(home):
    (home / "out" / "checkpoint-3").mkdir(parents=True)
    assert resume_folder("~/out/checkpoint-3", str(home / "out"), ()) == str(home / "out" / "checkpoint-3")
    (home / "p.jsonl").write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(3)))
    assert resolve_data_path("~/p.jsonl", str(home / "cfg.yaml")) == str(home / "p.jsonl")
    assert len(load_split("~/p.jsonl", "train")) == 3
