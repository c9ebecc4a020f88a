"""A cluster node without network: models, reward artifacts and revisions read from a Hugging Face cache laid out as
huggingface_hub lays it out (blobs, snapshots/<commit>, refs/), with HF_HUB_OFFLINE set (as this suite runs); what
needs the network fails in one line that says so; cards name no local path; `push_to_hub("you/rm")` is not read as a
commit message."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer, load_reward_model
from rlhf_ext.models import load_model, load_tokenizer
from rlhf_ext.testing import save_tiny_model

from .conftest import preference_rows
from .test_ppo import make


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """put(repo_id, folder, commit, ref="main"): `folder` as that repo's snapshot in a fresh cache."""
    import huggingface_hub.constants as constants

    root = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo_id: str, folder, commit: str, ref: str = "main") -> Path:
        repo = root / f"models--{repo_id.replace('/', '--')}"
        for f in Path(folder).rglob("*"):
            if f.is_file():
                blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
                blob.parent.mkdir(parents=True, exist_ok=True)
                blob.write_bytes(f.read_bytes())
                link = repo / "snapshots" / commit / f.relative_to(folder)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.relpath(blob, link.parent), link)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        return repo / "snapshots" / commit

    return put


def _reward_trainer(out, base, tok, **init):
    args = RewardEnsembleConfig(str(out), ensemble_size=2, max_steps=1, per_device_train_batch_size=8,
                                report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                                normalization_samples=8, model_init_kwargs=init or None)
    return RewardEnsembleTrainer(base, args=args, train_dataset=Dataset.from_list(preference_rows(8, 0)),
                                 processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_a_reward_artifact_from_the_hub_cache_joins_the_policy_base(hub_cache, tmp_path, tiny_path, tok):
    """`load_reward_model("you/rm")` loaded a pushed artifact, but as a PPO reward string (and a recipe's
    reward_model_path) it was tried as a sequence-classification model and refused."""
    rt = _reward_trainer(tmp_path / "rm", tiny_path, tok)
    rt.train()
    rt.save_model(str(tmp_path / "rm"))
    hub_cache("someorg/rm", tmp_path / "rm", "a" * 40)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*separate model.*")
        tr = make(tmp_path / "ppo", tok, model=load_model(tiny_path, "causal"), reward=["someorg/rm"], max_steps=1)
    member = tr.rewards.members[0]
    texts = (["write a short review ."] * 2, [" it was good .", " bad bad ."])
    assert member.names == ["member_0", "member_1"]
    assert torch.allclose(member.score_texts(*texts), load_reward_model(tmp_path / "rm").score_texts(*texts),
                          atol=1e-5)


def test_a_reward_model_records_the_revision_it_trained_on(hub_cache, tmp_path, tok):
    """Trained on revision v2 of a repo, the artifact recorded only the repo id: loaded again, main's weights came
    back and the fingerprint check refused them, blaming a change in memory."""
    hub_cache("someorg/tiny", save_tiny_model(tmp_path / "main", tok, seed=0), "a" * 40)
    hub_cache("someorg/tiny", save_tiny_model(tmp_path / "v2", tok, seed=1), "b" * 40, ref="v2")
    rt = _reward_trainer(tmp_path / "rm", "someorg/tiny", tok, revision="v2")
    rt.train()
    rt.save_model(str(tmp_path / "rm"))
    rm = load_reward_model(tmp_path / "rm")
    texts = (["write a short review ."], [" it was good ."])
    assert torch.allclose(rm.score_texts(*texts), rt.model.score_texts(*texts), atol=1e-5)


def test_a_hub_id_missing_from_the_cache_says_how_to_get_it(hub_cache):
    with pytest.raises(OSError, match=r"HF_HUB_OFFLINE is set .* does not hold 'someorg/absent' at revision 'v3'.*"
                                      r"hf download someorg/absent --revision v3"):
        load_model("someorg/absent", "causal", revision="v3")
    with pytest.raises(OSError, match=r"HF_HUB_OFFLINE is set .*hf download someorg/absent`"):
        load_tokenizer("someorg/absent")


def test_a_recipe_ends_an_unreachable_model_in_one_line():
    """`setup_phase` turned ValueError / FileNotFoundError into one line with status 2, but not the OSError a Hub
    id outside the cache raises (a 100-line traceback, status 1)."""
    from rlhf_ext.recipes import RecipeInputError, setup_phase

    with pytest.raises(RecipeInputError, match="HF_HUB_OFFLINE is set"):
        with setup_phase():
            load_model("someorg/absent", "causal")


def test_push_to_hub_with_a_repo_id_as_its_first_argument_is_refused(tmp_path, tiny_path, tok):
    """The first argument is the commit message, as in transformers' Trainer: `push_to_hub("you/rm")` uploaded to
    the output_dir's name with "you/rm" as the message (the README itself wrote it so)."""
    rt = _reward_trainer(tmp_path / "rm", tiny_path, tok)
    with pytest.raises(ValueError, match=r"push_to_hub\('you/rm'\).*would upload to 'rm'.*repo_id='you/rm'"):
        rt.push_to_hub("you/rm")
    tr = make(tmp_path / "ppo", tok, max_steps=1)
    with pytest.raises(ValueError, match=r"push_to_hub\('you/policy'\).*repo_id='you/policy'"):
        tr.push_to_hub("you/policy")


def test_a_policy_card_names_no_local_path(hub_cache, tmp_path, tok):
    """The card's metadata left local paths out, but its table and loading snippet printed the base's absolute
    folder (private, and useless elsewhere); a base loaded from the Hub cache is named by its Hub id."""
    local = save_tiny_model(tmp_path / "home" / "alice" / "sft", tok)
    snapshot = hub_cache("someorg/tiny", local, "c" * 40)
    for base, named in ((local, None), (str(snapshot), "someorg/tiny")):
        tr = make(tmp_path / f"ppo-{named is None}", tok, model=load_model(base, "causal"), max_steps=1)
        tr.model_name = base
        tr.save_model(str(tmp_path / f"policy-{named is None}"))
        card = (tmp_path / f"policy-{named is None}" / "README.md").read_text()
        assert str(tmp_path) not in card
        assert (f"base_model: {named}" in card) if named else "a local folder (`sft`)" in card


def test_an_adapter_or_a_checkpoint_given_as_a_model_says_what_it_is(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=1, save_strategy="steps", save_steps=1)
    tr.train()
    tr.save_model(str(tmp_path / "policy"))
    with pytest.raises(FileNotFoundError, match=r"It is a PEFT adapter .*merge_and_unload"):
        load_model(tmp_path / "policy", "causal")
    with pytest.raises(FileNotFoundError, match=r"It is a PPO checkpoint: continue its run with resume_from_checkpoint"):
        load_tokenizer(str(tmp_path / "ppo" / "checkpoint-1"))
