"""The models and data files people hand over: a model changed in memory before reward training (its artifact
must not reload other weights silently), flags that only apply to a name given with an object, a model built in
code without a tokenizer, meta-device weights, tied embeddings resized in memory, a single data file asked for a
test split, parquet and CSV files, a `prompt_length` column of the user's."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer, load_reward_model
from rlhf_ext.data import load_split
from rlhf_ext.testing import tiny_causal_lm

from .conftest import preference_rows
from .test_ppo import make

LORA = dict(r=4, target_modules=["q_proj", "v_proj"])


def _reward_args(out, **kw):
    return RewardEnsembleConfig(str(out), ensemble_size=2, ensemble_mode="adapters", max_steps=2,
                                per_device_train_batch_size=8, report_to="none", save_strategy="no", use_cpu=True,
                                disable_tqdm=True, normalization_samples=8, **kw)


def test_an_artifact_trained_on_a_model_changed_in_memory_is_not_reloaded_onto_other_weights(tmp_path, tiny_path,
                                                                                              tok):
    """An SFT adapter merged in memory, the merged model handed to the reward trainer: the artifact recorded the
    folder the model came from and reloaded its (other) weights, scoring 0.037 where the trained model scored
    −0.009, silently. The fingerprint it also recorded is now compared when the base loads."""
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), LoraConfig(**LORA, init_lora_weights=False))
    merged = sft.merge_and_unload()
    with torch.no_grad():  # the embeddings too, as a resize or an embedding-tuned SFT would change them
        merged.get_input_embeddings().weight[:8] += 0.5
    tr = RewardEnsembleTrainer(merged, args=_reward_args(tmp_path / "rm"), processing_class=tok,
                               train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               peft_config=LoraConfig(**LORA))
    tr.train()
    tr.save_model()
    with pytest.raises(ValueError, match=r"trained on weights that differ from those at its recorded base model.*"
                                         r"changed in memory.*model\.save_pretrained"):
        load_reward_model(str(tmp_path / "rm"))


def test_loading_flags_given_with_a_model_object_are_said_to_be_ignored_and_not_recorded(tmp_path, tiny_path, tok):
    """`load_in_4bit=True` with a model object trained in fp32 — and the artifact recorded load_in_4bit, so it reloaded
    its base quantised (other scores). PPO ignored load_in_4bit / quantization_config / model_init_kwargs silently."""
    with pytest.warns(UserWarning, match=r"RewardEnsembleTrainer: `model` is a model object, so load_in_4bit .* are "
                                         r"ignored; it trains as given \(float32\)"):
        tr = RewardEnsembleTrainer(AutoModelForCausalLM.from_pretrained(tiny_path), args=_reward_args(tmp_path / "rm"),
                                   processing_class=tok, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                                   peft_config=LoraConfig(**LORA), load_in_4bit=True)
    assert tr.artifact_spec()["load_in_4bit"] is False
    with pytest.warns(UserWarning, match=r"PPOTrainer: `model` is a model object, so model_init_kwargs .* ignored"):
        make(tmp_path / "ppo", tok, model_init_kwargs={"dtype": "bfloat16"})


def test_a_model_built_in_code_needs_its_tokenizer_and_meta_weights_are_refused(tmp_path, tok, monkeypatch):
    """Without processing_class the reward trainer read a tokenizer from the current directory (a model built in code
    has an empty _name_or_path, and Path('') is the cwd): trained silently with another tokenizer's ids there, a
    transformers error elsewhere. Meta-device weights failed deep in torch in both trainers."""
    tok.save_pretrained(tmp_path)  # a tokenizer where the run starts
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"Pass `processing_class` \(the tokenizer\) when `model` is an instantiated"):
        RewardEnsembleTrainer(tiny_causal_lm(tok), args=_reward_args(tmp_path / "rm"),
                              train_dataset=Dataset.from_list(preference_rows(16, 0)), peft_config=LoraConfig(**LORA))
    with torch.device("meta"):
        meta = tiny_causal_lm(tok)
    with pytest.raises(ValueError, match="the model's weights are on the meta device"):
        RewardEnsembleTrainer(meta, args=_reward_args(tmp_path / "rm2"), processing_class=tok,
                              train_dataset=Dataset.from_list(preference_rows(16, 0)), peft_config=LoraConfig(**LORA))
    with pytest.raises(ValueError, match="the model's weights are on the meta device"):
        make(tmp_path / "ppo", tok, model=meta)


def test_a_policy_whose_tied_embeddings_were_resized_in_memory_saves_and_reloads(tmp_path, tiny_path, tok):
    """A token added and the tied embeddings resized in memory: PPO trained, then save_model failed inside safetensors
    ('Some tensors share memory': the adapter's state holds the embedding and the LM head, one tensor). PEFT's own
    save_pretrained saves both; so does save_model now, and plain PEFT reloads the policy."""
    from peft import PeftModel

    tok = type(tok).from_pretrained(tiny_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    model.resize_token_embeddings(len(tok))
    from rlhf_ext import PPOConfig, PPOTrainer

    tr = PPOTrainer(model, reward_funcs=lambda completions, **k: [float(len(c)) for c in completions],
                    args=PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1,
                                   max_completion_length=4, use_cpu=True, save_strategy="no", monitor=False,
                                   disable_tqdm=True),
                    train_dataset=Dataset.from_dict({"prompt": ["write a short review of the movie ."] * 4}),
                    processing_class=tok, peft_config=LoraConfig(**LORA))  # q/v only: PEFT saves the resized layers
    tr.train()
    tr.save_model(str(tmp_path / "policy"))
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    base.resize_token_embeddings(len(tok))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "policy")).eval()
    ids = torch.tensor([[5, 6, 7, len(tok) - 1]])
    with torch.no_grad():
        want = tr.policy.logits(ids, torch.ones_like(ids), 3) * tr.args.temperature
        got = loaded(input_ids=ids).logits[:, :-1]
    assert torch.allclose(want, got, atol=1e-5)


def test_one_data_file_is_the_train_split_only_and_parquet_and_csv_load(tmp_path):
    """`load_split(file, "test")` returned the file's rows again: the reward recipe's held-out accuracy and the PPO
    recipe's evaluation ran on the training data, silently. A parquet or CSV file was refused as missing, or looked
    up on the Hub."""
    rows = [{"prompt": f"write a short review of the {w} ."} for w in ("movie", "book", "song")]
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_split(str(f), "train")["prompt"] == [r["prompt"] for r in rows]
    with pytest.raises(FileNotFoundError, match=r"is one file, the 'train' split only: there is no 'test' split"):
        load_split(str(f), "test")
    Dataset.from_list(rows).to_parquet(str(tmp_path / "prompts.parquet"))
    Dataset.from_list(rows).to_csv(str(tmp_path / "prompts.csv"), index=False)
    for name in ("prompts.parquet", "prompts.csv"):
        assert load_split(str(tmp_path / name), "train")["prompt"] == [r["prompt"] for r in rows]
    with pytest.raises(FileNotFoundError, match=r"no such folder or \.jsonl / \.json / \.parquet / \.csv file"):
        load_split(str(tmp_path / "missing.parquet"), "train")


def test_a_prompt_length_column_of_the_users_is_replaced(tmp_path, tiny_path, tok):
    """A `prompt_length` column in the data (the prompt's length in characters, say) was taken as its token count:
    response lengths — and the length de-correlation — came out wrong. It is measured, whatever the data says."""
    rows = [{"prompt": f"write a short review of the {w} . ", "chosen": f"the {w} was good .",
             "rejected": f"the {w} was bad and boring ."} for w in ("movie", "book")]
    given = [{**r, "prompt_length": len(r["prompt"])} for r in rows]
    tr = RewardEnsembleTrainer(tiny_path, args=_reward_args(tmp_path / "rm"), processing_class=tok,
                               train_dataset=Dataset.from_list(given), peft_config=LoraConfig(**LORA))
    batch = tr.data_collator([tr.train_dataset[i] for i in range(2)])
    eos = tok.eos_token
    want = [len(tok(text=r[side] + eos)["input_ids"]) for side in ("chosen", "rejected") for r in rows]
    assert batch["response_length"].tolist() == want


def _sft_adapter(tmp_path, tiny_path, tok):
    """An SFT LoRA adapter folder as TRL's SFTTrainer saves one: adapter_config.json (naming its base folder), the
    trained adapter weights (a non-zero B) and the tokenizer."""
    folder = tmp_path / "sft"
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), LoraConfig(**LORA, init_lora_weights=False))
    sft.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_an_sft_adapter_loaded_through_transformers_is_refused_not_silently_dropped(tmp_path, tiny_path, tok):
    """transformers loads an adapter folder onto its base (`from_pretrained(<adapter folder>)`, `load_adapter`) as
    LoRA layers in a plain model. Both trainers wrapped that model in their own PeftModel, where the SFT adapter stayed
    inactive: PPO's policy and reference both started from the base, the reward members trained on the base — only
    PEFT's "multiple adapters … know what you are doing" was said."""
    folder = _sft_adapter(tmp_path, tiny_path, tok)
    loaded = AutoModelForCausalLM.from_pretrained(folder)  # the base, with the adapter on it
    with pytest.raises(ValueError, match=r"PPOTrainer: `model` carries PEFT adapter\(s\) loaded through transformers "
                                         r".*silently start from the base.*merge_and_unload\(\).*model=dir"):
        make(tmp_path / "ppo", tok, model=loaded)
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    base.load_adapter(str(folder))
    with pytest.raises(ValueError, match=r"RewardEnsembleTrainer: `model` carries PEFT adapter.*"
                                         r"PeftModel\.from_pretrained\(base, \"<adapter folder>\", is_trainable=True\)"):
        RewardEnsembleTrainer(base, args=_reward_args(tmp_path / "rm"), processing_class=tok,
                              train_dataset=Dataset.from_list(preference_rows(16, 0)), peft_config=LoraConfig(**LORA))


def test_an_sft_adapter_folder_with_its_bases_config_json_is_named_as_an_adapter(tmp_path, tiny_path, tok):
    """alignment-handbook's SFT script saves the base's config.json beside the adapter: the folder passed every check
    and transformers said only "no file named model.safetensors"."""
    from rlhf_ext.models import load_model

    folder = _sft_adapter(tmp_path, tiny_path, tok)
    AutoModelForCausalLM.from_pretrained(tiny_path).config.save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match=r"holds no model weights, only a PEFT adapter.*It is a PEFT adapter "
                                                r".*merge_and_unload\(\); merged\.save_pretrained\(out\); "
                                                r"tokenizer\.save_pretrained\(out\)"):
        load_model(str(folder), "causal")


def test_an_sft_adapter_merged_in_memory_is_said_to_differ_from_the_base_it_is_named_after(tmp_path, tiny_path,
                                                                                            tiny4_path, tok):
    """`merge_and_unload()` keeps the base's `_name_or_path`, and the embedding-only fingerprint matches the base: the
    saved policy's adapter_config.json and card named the pretrained folder as its base (reloaded there, its logits
    were off by 0.5), and a reward artifact recorded it and reloaded it silently. Said when the trainer starts, in
    full precision and on a 4-bit base (QLoRA: the merge requantises), and never for the checkpoint's own weights."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    from rlhf_ext.models import changed_from_checkpoint, load_model

    folder = _sft_adapter(tmp_path, tiny_path, tok)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), folder).merge_and_unload()
    assert merged.config._name_or_path == tiny_path
    said = r"`model`'s weights differ from those saved at .*merge_and_unload\(\).*{}.*model\.save_pretrained\(dir\)"
    with pytest.warns(UserWarning, match="PPOTrainer: " + said.format("The saved policy")):
        make(tmp_path / "ppo", tok, model=merged, max_steps=1)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), folder).merge_and_unload()
    with pytest.warns(UserWarning, match="RewardEnsembleTrainer: " + said.format(r"load_reward_model\(path\)")):
        RewardEnsembleTrainer(merged, args=_reward_args(tmp_path / "rm"), processing_class=tok,
                              train_dataset=Dataset.from_list(preference_rows(16, 0)), peft_config=LoraConfig(**LORA))
    for dtype in (torch.float32, torch.bfloat16):  # the checkpoint's own weights, in any precision: nothing to say
        assert changed_from_checkpoint(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=dtype), tiny_path) == []
    folder4 = _sft_adapter(tmp_path / "four", tiny4_path, tok)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    assert changed_from_checkpoint(load_model(tiny4_path, "causal", load_in_4bit=True), tiny4_path) == []
    qlora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny4_path, quantization_config=nf4), folder4)
    assert changed_from_checkpoint(qlora, tiny4_path) == []  # the adapter unmerged: the base is the checkpoint's
    assert changed_from_checkpoint(qlora.merge_and_unload(), tiny4_path)
    assert changed_from_checkpoint(merged, "someorg/not-in-the-cache") is None  # nothing at hand to compare with


def test_a_reward_model_trained_on_the_pretrained_base_is_not_hosted_on_a_merged_sft_policy(tmp_path, tiny_path, tok):
    """The SFT adapter merged and saved (the usual SFT → PPO path), a reward artifact trained on the pretrained base:
    the embedding fingerprints match, so PPO hosted the reward members on the SFT policy's base — its scores off by
    twice their spread across responses, silently. Now the policy's weights are compared with the artifact's base."""
    from peft import PeftModel

    from rlhf_ext import load_reward_model

    sft = tmp_path / "sft-merged"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path),
                                       _sft_adapter(tmp_path, tiny_path, tok)).merge_and_unload()
    merged.save_pretrained(sft)
    tok.save_pretrained(sft)
    rm = RewardEnsembleTrainer(tiny_path, args=_reward_args(tmp_path / "rm"), processing_class=tok,
                               train_dataset=Dataset.from_list(preference_rows(16, 0)), peft_config=LoraConfig(**LORA))
    rm.train()
    rm.save_model()
    with pytest.warns(UserWarning, match=r"it was trained on .*a different base from this policy's"):
        tr = make(tmp_path / "ppo", tok, model=str(sft), reward=[str(tmp_path / "rm")], max_steps=1)
    hosted, alone = tr.rewards.members[0], load_reward_model(str(tmp_path / "rm"))
    assert hosted.model is not tr.policy.peft
    rows = Dataset.from_list(preference_rows(8, 5))
    assert torch.equal(hosted.score_texts(rows["prompt"], rows["chosen"]), alone.score_texts(rows["prompt"], rows["chosen"]))


def test_a_base_object_reused_after_an_earlier_trainer_is_not_refused_as_a_loaded_adapter(tmp_path, tiny_path, tok):
    """PEFT injects a trainer's LoRA layers into the model object in place: the same loaded base handed to the reward
    trainer and then to PPO was refused as an SFT adapter "loaded through
    transformers", told to merge it — the reward adapter — into the policy. Those adapters stay inactive under the next
    trainer's own (the policy starts at the base, which the hard KL start-up check confirms)."""
    from peft.tuners.lora import LoraLayer

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    rm = RewardEnsembleTrainer(base, args=_reward_args(tmp_path / "rm", learning_rate=1e-1),
                               processing_class=tok, train_dataset=Dataset.from_list(preference_rows(32, 0)),
                               peft_config=LoraConfig(**LORA))
    rm.train()
    make(tmp_path / "ppo", tok, model=base, max_steps=1, kl_controller="hard", kl_target=0.1)
    layer = next(m for m in base.modules() if isinstance(m, LoraLayer))
    assert layer.active_adapters == ["policy"]


def test_a_stray_unreadable_safetensors_file_beside_the_checkpoint_does_not_stop_a_trainer(tmp_path, tok):
    """`changed_from_checkpoint` opened every *.safetensors of the model's folder: a git-lfs pointer left by a partial
    clone (Mistral's consolidated.safetensors) raised SafetensorError from PPOTrainer's start, where from_pretrained
    had loaded the model fine. Such a file is skipped; the model's own files are still compared."""
    from rlhf_ext.models import changed_from_checkpoint
    from rlhf_ext.testing import save_tiny_model

    path = save_tiny_model(tmp_path / "m", tok)
    model = AutoModelForCausalLM.from_pretrained(path)
    (tmp_path / "m" / "consolidated.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                                              "oid sha256:0\nsize 1\n")
    assert changed_from_checkpoint(model, path) == []
    make(tmp_path / "ppo", tok, model=model, max_steps=1)
