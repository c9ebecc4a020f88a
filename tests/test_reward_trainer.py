import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer, load_reward_model
from rlhf_ext.data import pad_ids
from rlhf_ext.reward.ensemble import pool_last, pool_mean, reward_input_ids

from .conftest import preference_rows


def make_args(tmp_path, **kw):
    base = dict(num_train_epochs=2, per_device_train_batch_size=16, learning_rate=3e-3, report_to="none",
                save_strategy="no", eval_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100,
                normalization_samples=64)
    base.update(kw)
    return RewardEnsembleConfig(str(tmp_path / "rm"), **base)


LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def test_loss_equals_bradley_terry(tmp_path, tiny_path, tok, pref_data):
    tr = RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path), train_dataset=pref_data[0], processing_class=tok)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    batch["margin"] = torch.full((4,), 0.3)
    tr.model.eval()
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, dict(batch))
        r = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:, 0]
    expected = -torch.nn.functional.logsigmoid(r[:4] - r[4:] - 0.3).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_compute_loss_called_directly_after_training_is_its_batchs_weighted_mean(tmp_path, tiny_path, tok):
    """K > 1 with bootstrap: the last training step's per-member weight totals divided a compute_loss called directly
    after train() (or a training_step), not that batch's own (0.248 where the batch's weighted BT mean is 0.298)."""
    args = make_args(tmp_path, ensemble_size=2, bootstrap=True, max_steps=2, per_device_train_batch_size=4,
                     length_decorrelation_coef=0.0, normalization_samples=8)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               processing_class=tok)
    tr.train()
    batch = tr.data_collator([tr.train_dataset[i] for i in (8, 9, 10, 11)])
    tr.model.train()  # a training-mode call: bootstrap weights apply
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, dict(batch))
        r = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
    w = tr.bootstrap_weights[:, batch["pair_id"]].T
    per_pair = -torch.nn.functional.logsigmoid(r[:4] - r[4:])
    expected = ((per_pair * w).sum(0) / w.sum(0).clamp(min=1e-6)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("conversational", [True, False])
def test_training_lifts_heldout_accuracy(tmp_path, tiny_path, tok, conversational):
    train = Dataset.from_list(preference_rows(256, 0, conversational))
    test = Dataset.from_list(preference_rows(64, 1, conversational))
    tr = RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path, num_train_epochs=3, learning_rate=5e-3), train_dataset=train,
                               eval_dataset=test, processing_class=tok, peft_config=LoraConfig(**LORA))
    before = tr.evaluate()["eval_accuracy_ensemble"]
    tr.train()
    after = tr.evaluate()
    assert after["eval_accuracy_ensemble"] >= 0.9 and after["eval_accuracy_ensemble"] > before
    for key in ("eval_ece", "eval_length_pearson", "eval_accuracy_member_0"):
        assert key in after


@pytest.mark.parametrize("mode,peft,top,pooling", [("heads", False, 0, "last"), ("heads", True, 0, "last"),
                                                   ("adapters", True, 0, "last"), ("heads", True, 1, "last"),
                                                   ("adapters", True, 1, "mean"), ("heads", False, 0, "mean")])
def test_ensemble_members_differ_and_reload_identically(tmp_path, tiny_path, tok, pref_data, mode, peft, top, pooling):
    """Reload in a fresh process's way (base from the recorded path); `top`: LoRA on the last layer(s) only."""
    args = make_args(tmp_path, ensemble_size=3, ensemble_mode=mode, num_train_epochs=1, lora_top_layers=top,
                     pooling=pooling)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=pref_data[0], eval_dataset=pref_data[1],
                               processing_class=tok, peft_config=LoraConfig(**LORA) if peft else None)
    tr.train()
    out = tmp_path / "artifact"
    tr.save_model(str(out))
    assert not [f for f in out.rglob("*") if f.suffix in (".bin", ".pt", ".pkl")]  # safetensors + JSON only
    ens = load_reward_model(out)
    rows = pref_data[1].select(range(8))
    scores = ens.score_texts(rows["prompt"], rows["chosen"])
    assert scores.shape == (8, 3)
    assert (scores[:, 0] - scores[:, 1]).abs().max() > 1e-4 and (scores[:, 1] - scores[:, 2]).abs().max() > 1e-4
    # the training-time model gives the same numbers
    seqs = [reward_input_ids(tok, p, c) for p, c in zip(rows["prompt"], rows["chosen"])]
    ids, mask = pad_ids(seqs, tok.pad_token_id)
    direct = tr.model.score_ids(ids, mask)
    assert torch.allclose(scores, direct, atol=1e-5)
    assert len(ens.mean) == 3 and (ens.std > 0).all()
    if top:  # artifacts written without `layers_pattern` (earlier versions) still load onto the bare trunk
        spec_file = out / "rlhf_ext_reward.json"
        spec = json.loads(spec_file.read_text())
        assert spec["lora_config"].pop("layers_pattern") == "layers"
        spec_file.write_text(json.dumps(spec))
        (out / "manifest.json").unlink()  # earlier versions wrote no manifest either
        assert torch.allclose(load_reward_model(out).score_texts(rows["prompt"], rows["chosen"]), scores, atol=1e-5)


def test_length_decorrelation_penalty_lowers_correlation(tmp_path, tiny_path, tok):
    # chosen is always longer: a pure length signal the penalty must push back on
    rows = []
    for r in preference_rows(192, 3):
        r["chosen"][0]["content"] = "the movie was very very so " + r["chosen"][0]["content"]
        rows.append(r)
    data = Dataset.from_list(rows)
    corr = {}
    for coef in (0.0, 2.0):
        tr = RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path, length_decorrelation_coef=coef, num_train_epochs=2),
                                   train_dataset=data, eval_dataset=data.select(range(64)), processing_class=tok,
                                   peft_config=LoraConfig(**LORA))
        tr.train()
        corr[coef] = tr.evaluate()["eval_length_pearson"]
    assert corr[2.0] < corr[0.0]


def test_4bit_lora_trains_every_layer_even_after_an_eval_pass(tmp_path, tiny4_path, tok, pref_data):
    """On AVX512-BF16 CPUs a no-grad eval forward used to repack NF4 weights into a layout without backward, after
    which gradients stopped at every 4-bit layer. Evaluate first, then check that *every* LoRA-B (each sits on a
    4-bit layer) moved off zero."""
    tr = RewardEnsembleTrainer(tiny4_path, args=make_args(tmp_path, num_train_epochs=1, max_steps=4),
                               train_dataset=pref_data[0], eval_dataset=pref_data[1], processing_class=tok,
                               peft_config=LoraConfig(**LORA), load_in_4bit=True)
    assert getattr(tr.model.model.get_base_model(), "is_loaded_in_4bit", False)
    tr.evaluate()  # the no-grad eval forward that used to break training
    lora_b = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 4 and all(float(p.abs().max()) == 0 for p in lora_b.values())
    tr.train()
    params = dict(tr.model.named_parameters())
    assert all(float(params[n].abs().max()) > 0 for n in lora_b), [n for n in lora_b if float(params[n].abs().max()) == 0]


@pytest.mark.parametrize("mutate,match", [
    (lambda rows: [{k: v for k, v in r.items() if k != "rejected"} for r in rows], "missing column"),
    (lambda rows: [dict(r, chosen=[{"role": "assistant", "content": "  "}]) if i == 3 else r for i, r in enumerate(rows)], "row 3: 'chosen' is empty"),
    (lambda rows: [dict(r, margin=float("nan")) for r in rows], "not a finite number"),
])
def test_bad_preference_data(tmp_path, tiny_path, tok, mutate, match):
    data = Dataset.from_list(mutate(preference_rows(8, 0)))
    with pytest.raises(ValueError, match=match):
        RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path), train_dataset=data, processing_class=tok)


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match="ensemble_size must be an integer ≥ 1"):
        make_args(tmp_path, ensemble_size=0)
    with pytest.raises(ValueError, match="Unknown ensemble_mode 'bagging'"):
        make_args(tmp_path, ensemble_mode="bagging")
    with pytest.raises(ValueError, match="Unknown pooling 'max'; use 'last'"):
        make_args(tmp_path, pooling="max")


def test_adapters_mode_requires_lora(tmp_path, tiny_path, tok, pref_data):
    with pytest.raises(ValueError, match="peft_config=LoraConfig"):
        RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path, ensemble_size=2, ensemble_mode="adapters"),
                              train_dataset=pref_data[0], processing_class=tok)


def test_missing_artifact_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an rlhf_ext reward-model artifact"):
        load_reward_model(tmp_path)


@pytest.mark.parametrize("mode", ["heads", "adapters"])
def test_frozen_prefix_cache_is_exact(tmp_path, tok, pref_data, mode):
    """LoRA on the top layer only: epochs reuse the cached lower layers and train exactly as without the cache."""
    from rlhf_ext.testing import save_tiny_model

    path = save_tiny_model(tmp_path / "deep", tok, num_layers=3)
    runs = []
    for cache in (True, False):
        torch.manual_seed(0)
        args = make_args(tmp_path / str(cache), ensemble_size=2, ensemble_mode=mode, num_train_epochs=2,
                         lora_top_layers=1, cache_frozen_layers=cache)
        tr = RewardEnsembleTrainer(path, args=args, train_dataset=pref_data[0], eval_dataset=pref_data[1],
                                   processing_class=tok, peft_config=LoraConfig(**LORA))
        assert (tr.prefix_cache is not None) == cache
        tr.train()
        runs.append((tr.evaluate(), {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}))
    (m_a, p_a), (m_b, p_b) = runs
    assert all("layers.2." in n or n.startswith("heads.") for n in p_a)  # LoRA sits on the last layer only
    for n in p_a:
        assert torch.allclose(p_a[n], p_b[n], atol=1e-5), n
    assert m_a["eval_accuracy_ensemble"] == m_b["eval_accuracy_ensemble"]


def test_lora_top_layers_validated(tmp_path, tiny_path, tok, pref_data):
    with pytest.raises(ValueError, match="lora_top_layers=5 but the model has 2 layers"):
        RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path, lora_top_layers=5), train_dataset=pref_data[0],
                              processing_class=tok, peft_config=LoraConfig(**LORA))


def test_pooling_ignores_padding_side():
    h = torch.randn(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    h_left = h.clone()
    h_left[0, 2:] = h[0, :3]  # the same three tokens, left-padded
    for pool in (pool_last, pool_mean):
        assert torch.allclose(pool(h, right), pool(h_left, left))
    assert torch.allclose(pool_mean(h, right)[0], h[0, :3].mean(0))
    assert torch.allclose(pool_last(h, right)[0], h[0, 2])


# ---------------------------------------------------------------- behaviours kept from trl.RewardTrainer
def _quick(tmp_path, **kw):
    return make_args(tmp_path, **{"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                                  "normalization_samples": 8, **kw})


def _seq_cls(tok, seed=0, score=None):
    """A tiny LlamaForSequenceClassification (num_labels=1); `score` sets its head to a fixed value (a trained RM)."""
    from transformers import LlamaForSequenceClassification

    from rlhf_ext.testing import tiny_config

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))
    if score is not None:
        with torch.no_grad():
            model.score.weight.copy_(score * torch.randn_like(model.score.weight))
    return model


def _distinct_pad_tok():
    """The tiny tokenizer with a pad token that is not its EOS (transformers' seq-cls pooling then reads the EOS)."""
    from rlhf_ext.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.pad_token = "<|endoftext|>"
    return tok


@pytest.mark.parametrize("mode,K", [("heads", 1), ("adapters", 2)])
def test_peft_model_trains_its_adapter_and_leaves_the_base_untouched(tmp_path, tok, mode, K):
    from peft import get_peft_model

    path = str(tmp_path / "sc")
    _seq_cls(tok).save_pretrained(path)
    tok.save_pretrained(path)
    from transformers import AutoModelForSequenceClassification

    pm = get_peft_model(AutoModelForSequenceClassification.from_pretrained(path),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    data = Dataset.from_list(preference_rows(16, 0))
    tr = RewardEnsembleTrainer(pm, args=_quick(tmp_path, ensemble_size=K, ensemble_mode=mode), train_dataset=data,
                               processing_class=tok)
    assert tr.model.adapters[0] == "default" and len(tr.model.adapters) == (1 if mode == "heads" else K)
    tr.train()
    after = dict(pm.named_parameters())
    lora = [n for n in before if ".lora_" in n and ".default." in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base), [n for n in base if not torch.equal(before[n], after[n])]
    tr.save_model(str(tmp_path / "art"))  # adapters relative to the trunk: reloads on the bare base
    rows = data.select(range(4))
    assert torch.allclose(load_reward_model(tmp_path / "art").score_texts(rows["prompt"], rows["chosen"]),
                          tr.model.score_texts(rows["prompt"], rows["chosen"]), atol=1e-5)


def test_peft_model_with_peft_config_is_refused_as_in_trl(tmp_path, tok, tiny_path):
    from peft import get_peft_model

    pm = get_peft_model(_seq_cls(tok), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PeftModel.*together with a `peft_config`"):
        RewardEnsembleTrainer(pm, args=_quick(tmp_path), train_dataset=Dataset.from_list(preference_rows(8, 0)),
                              processing_class=tok, peft_config=LoraConfig(r=4))


def _stream(rows):
    from datasets import IterableDataset

    def gen():
        yield from rows

    return IterableDataset.from_generator(gen)


def test_streaming_train_and_eval(tmp_path, tiny_path, tok):
    from rlhf_ext.reward.preference_data import hashed_bootstrap_weights

    args = _quick(tmp_path, ensemble_size=2)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=_stream(preference_rows(16, 0)),
                               eval_dataset=_stream(preference_rows(8, 1)), processing_class=tok)
    assert tr.bootstrap_weights is None  # no table over a stream: per pair, from a hash of its id
    w = hashed_bootstrap_weights(torch.arange(400), 2, 1)
    assert torch.equal(w, hashed_bootstrap_weights(torch.arange(400), 2, 1)) and w.shape == (400, 2)
    assert abs(w.mean().item() - 1) < 0.15 and (w == 0).any() and (w >= 2).any() and not torch.equal(w[:, 0], w[:, 1])
    seen = []
    orig = tr._member_weights
    tr._member_weights = lambda inputs, like, **kw: seen.append(orig(inputs, like, **kw)) or seen[-1]
    tr.train()
    assert any((s != 1).any() for s in seen)  # the bootstrap applied
    assert tr.normalization["n"] == 16 and "eval_accuracy_ensemble" in tr.evaluate()
    with pytest.raises(ValueError, match="extra_preferences needs a sized train_dataset"):
        RewardEnsembleTrainer(tiny_path, args=_quick(tmp_path, extra_preferences=["x.jsonl"]),
                              train_dataset=_stream(preference_rows(8, 0)), processing_class=tok)
    bad = preference_rows(8, 0)
    bad[5]["chosen"] = 7
    with pytest.raises(ValueError, match="row 5: 'chosen' is a int"):  # rows are checked as they stream by (here: at
        RewardEnsembleTrainer(tiny_path, args=_quick(tmp_path), train_dataset=_stream(bad),  # the start-up length peek)
                              processing_class=tok)


def test_legacy_pretokenised_columns_are_renamed_with_a_future_warning(tmp_path, tiny_path, tok):
    rows = [{"chosen_input_ids": tok(r["prompt"] + r["chosen"])["input_ids"],
             "rejected_input_ids": tok(r["prompt"] + r["rejected"])["input_ids"]}
            for r in preference_rows(16, 0, conversational=False)]
    with pytest.warns(FutureWarning, match="will not be supported in v1"):
        tr = RewardEnsembleTrainer(tiny_path, args=_quick(tmp_path), train_dataset=Dataset.from_list(rows),
                                   processing_class=tok)
    assert {"chosen_ids", "rejected_ids"} <= set(tr.train_dataset.column_names)
    assert tr.train_dataset[0]["chosen_ids"] == rows[0]["chosen_input_ids"]
    tr.train()


def test_model_tags_reach_the_model_and_the_card(tmp_path, tiny_path, tok):
    tr = RewardEnsembleTrainer(tiny_path, args=_quick(tmp_path), train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               processing_class=tok)
    assert {"trl", "reward-trainer", "rlhf_ext"} <= set(tr.model.model_tags)
    tr.train()
    tr.save_model(str(tmp_path / "art"))
    card = (tmp_path / "art" / "README.md").read_text()
    assert all(t in card.split("---")[1] for t in ("trl", "reward-trainer", "rlhf_ext"))
    assert "reward-trainer" in load_reward_model(tmp_path / "art").model_tags


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("as_path", [True, False])
def test_trained_sequence_classification_head_is_kept(tmp_path, K, as_path, caplog):
    """A trained RM (seq-cls, num_labels=1) continues from its own head: K=1 scores exactly what it scored; an
    ensemble's heads start from it (plus a small per-member perturbation). The caller's config is not edited."""
    import logging

    tok = _distinct_pad_tok()
    rm = _seq_cls(tok, score=10.0)
    path = str(tmp_path / "rm")
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    data = Dataset.from_list(preference_rows(16, 0))
    with caplog.at_level(logging.INFO, logger="rlhf_ext.reward.trainer"):
        tr = RewardEnsembleTrainer(path if as_path else rm, args=_quick(tmp_path, ensemble_size=K), train_dataset=data,
                                   processing_class=tok)
    assert tr.head_init == ("checkpoint" if K == 1 else "checkpoint+noise")
    assert "trained head" in caplog.text
    batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        expected = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [8, 1]
        ours = tr.model.score_ids(batch["input_ids"], batch["attention_mask"])  # [8, K]
    assert expected.abs().mean() > 2  # far from a fresh head's ≈ 0
    if K == 1:
        assert torch.allclose(ours, expected, atol=1e-4)
    else:
        assert torch.allclose(ours.mean(-1, keepdim=True), expected, atol=0.5) and (ours.std(-1) > 0).all()


def test_model_config_is_not_edited(tmp_path, tok):
    from rlhf_ext.testing import tiny_causal_lm

    lm = tiny_causal_lm(tok)
    labels = dict(lm.config.id2label)
    tr = RewardEnsembleTrainer(lm, args=_quick(tmp_path), train_dataset=Dataset.from_list(preference_rows(8, 0)),
                               processing_class=tok)
    assert lm.config.num_labels == len(labels) == 2 and lm.config.id2label == labels
    assert tr.model.config.num_labels == 1 and tr.model.config is not lm.config


def test_seq_cls_with_pad_equal_to_eos_warns_that_the_scoring_position_differs(tmp_path, tok):
    with pytest.warns(UserWarning, match="pad_token_id == the EOS id.*token before the final EOS"):
        RewardEnsembleTrainer(_seq_cls(tok, score=1.0), args=_quick(tmp_path),
                              train_dataset=Dataset.from_list(preference_rows(8, 0)), processing_class=tok)


def test_center_rewards_is_trls_summed_pair_term(tmp_path, tiny_path, tok, pref_data):
    tr = RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path, center_rewards_coefficient=0.7),
                               train_dataset=pref_data[0], processing_class=tok)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        tr.model.heads["full"].weight.mul_(200)  # rewards of order 1, so the two forms differ clearly
    tr.model.eval()
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, dict(batch))
        r = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:, 0]
    rc, rr = r[:4], r[4:]
    expected = -torch.nn.functional.logsigmoid(rc - rr).mean() + 0.7 * ((rc + rr) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - (expected - 0.7 * ((rc + rr) ** 2).mean() + 0.7 * (r**2).mean()).item()) > 1e-3


def test_extra_preferences_are_applied_by_the_trainer(tmp_path, tiny_path, tok):
    extra = tmp_path / "review.jsonl"
    rows = preference_rows(5, 9)
    extra.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = Dataset.from_list(preference_rows(16, 0))
    tr = RewardEnsembleTrainer(tiny_path, args=_quick(tmp_path, extra_preferences=[str(extra)]), train_dataset=data,
                               processing_class=tok)
    assert len(tr.train_dataset) == 21 and tr.train_dataset[20]["chosen"][-1] == rows[4]["chosen"][-1]
    from rlhf_ext.data import with_extra_preferences

    with pytest.warns(UserWarning, match="already ends with the 5 pair.*not added a second time"):
        tr = RewardEnsembleTrainer(tiny_path, args=_quick(tmp_path, extra_preferences=[str(extra)]),
                                   train_dataset=with_extra_preferences(data, [str(extra)]), processing_class=tok)
    assert len(tr.train_dataset) == 21
    with pytest.raises(FileNotFoundError, match="extra_preferences: no file .*missing.jsonl"):
        RewardEnsembleTrainer(tiny_path, args=_quick(tmp_path, extra_preferences=[str(tmp_path / "missing.jsonl")]),
                              train_dataset=data, processing_class=tok)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl holds no preference pairs"):
        RewardEnsembleTrainer(tiny_path, args=_quick(tmp_path, extra_preferences=[str(tmp_path / "empty.jsonl")]),
                              train_dataset=data, processing_class=tok)


def test_recipe_does_not_add_extra_preferences_itself():
    import inspect

    import recipes.reward_modeling as recipe

    assert "with_extra_preferences" not in inspect.getsource(recipe)


@pytest.mark.parametrize("as_instance", [False, True])
def test_4bit_layout_is_checked_after_no_grad_passes_and_at_the_first_step(tmp_path, tiny4_path, tok, pref_data,
                                                                           as_instance):
    from rlhf_ext.models import load_model

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    model = load_model(tiny4_path, "causal", load_in_4bit=True) if as_instance else tiny4_path
    tr = RewardEnsembleTrainer(model, args=_quick(tmp_path), train_dataset=pref_data[0].select(range(16)),
                               processing_class=tok, peft_config=LoraConfig(**LORA), load_in_4bit=not as_instance)
    assert tr.quantized
    tr.train()  # the layout is checked at the first step and after the normalisation pass: fine
    layer = tr.model.model.get_base_model().layers[0].self_attn.q_proj

    def repack():
        layer.weight.data, layer.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state)

    repack()  # as if something re-enabled bitsandbytes' CPU inference layout
    with pytest.raises(RuntimeError, match="RewardEnsembleTrainer: 1 4-bit layer.*inference layout.*q_proj"):
        tr.compute_normalization(max_pairs=4)
    with pytest.raises(RuntimeError, match="RewardEnsembleTrainer: 1 4-bit layer.*q_proj"):
        tr.train()


@pytest.mark.parametrize("peft,pooling", [(True, "mean"), (False, "mean"), (True, "response")])
def test_heads_only_trains_the_heads_and_nothing_below(tmp_path, tiny_path, tok, peft, pooling):
    """heads_only: a linear probe. The heads move and learn the task; every trunk and adapter weight stays as it
    started (LoRA B stays 0, so the scores equal a plain base-model forward through the heads); the saved model
    reloads to the same scores."""
    train = Dataset.from_list(preference_rows(256, 0, True))
    test = Dataset.from_list(preference_rows(64, 1, True))
    args = make_args(tmp_path, num_train_epochs=3, learning_rate=2e-2, ensemble_size=2, heads_only=True,
                     pooling=pooling)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=train, eval_dataset=test, processing_class=tok,
                               peft_config=LoraConfig(**LORA) if peft else None)
    below = {n: p.detach().clone() for n, p in tr.model.model.named_parameters()}
    heads = {n: p.detach().clone() for n, p in tr.model.heads.named_parameters()}
    assert not [n for n, p in tr.model.model.named_parameters() if p.requires_grad]
    before = tr.evaluate()["eval_accuracy_ensemble"]
    tr.train()
    after = tr.evaluate()["eval_accuracy_ensemble"]
    assert after > before and after >= 0.75
    assert all(torch.equal(p, below[n]) for n, p in tr.model.model.named_parameters())
    assert all(not torch.equal(p, heads[n]) for n, p in tr.model.heads.named_parameters())
    if peft:
        assert all(torch.all(p == 0) for n, p in tr.model.model.named_parameters() if "lora_B" in n)
    # the trunk is the base model: the heads over a plain base forward, mean-pooled, give the ensemble's scores
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_path).eval()
    rows = [test[i] for i in range(8)]
    seqs = [reward_input_ids(tok, r["prompt"], r["chosen"]) for r in rows]
    ids, mask = pad_ids(seqs, tok.pad_token_id)
    # the pooled tokens, counted independently: all of them, or those after the prompt + generation prompt
    prompt_len = [len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]) for r in rows]
    pooled = mask.clone()
    if pooling == "response":
        for i, n in enumerate(prompt_len):
            pooled[i, :n] = 0
    with torch.no_grad():
        h = pool_mean(base(input_ids=ids, attention_mask=mask).last_hidden_state, pooled)
        expected = torch.cat([tr.model.heads[a](h) for a in tr.model.adapters], -1)
    assert torch.allclose(tr.model.score_ids(ids, mask), expected, atol=1e-5)
    tr.save_model(str(tmp_path / "rm"))
    again = load_reward_model(str(tmp_path / "rm"))
    assert torch.allclose(again.score_ids(ids, mask), expected, atol=1e-5)


def test_response_mask_keeps_the_tokens_after_the_last_assistant_header(tok):
    from rlhf_ext.reward.ensemble import assistant_header_ids, response_mask

    header = assistant_header_ids(tok)
    assert header and tok.convert_ids_to_tokens(header)[0] == "<|im_start|>"
    one = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "nice day"}]
    two = one + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "very good indeed"}]
    rows = [tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"] for m in (one, two)]
    rows.append(tok("plain text, no template").input_ids)
    starts = [len(tok.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
                  ["input_ids"]) for m in (one, two)] + [0]
    for side in ("right", "left"):
        ids, mask = pad_ids(rows, tok.pad_token_id, side=side)
        got = response_mask(ids, mask, header)
        for i, (row, start) in enumerate(zip(rows, starts)):
            kept = ids[i][got[i].bool()].tolist()
            assert kept == row[start:], (side, i)


def test_response_pooling_needs_a_chat_template(tmp_path, tiny_path, tok, pref_data):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ValueError, match="pooling='mean'"):
        RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path, pooling="response"), train_dataset=pref_data[0],
                              processing_class=plain)


def test_heads_only_refuses_adapter_members(tmp_path):
    with pytest.raises(ValueError, match="ensemble_mode='heads'"):
        make_args(tmp_path, heads_only=True, ensemble_mode="adapters", ensemble_size=3)


def test_normalization_reads_the_first_eval_pairs_within_max_length_tokenized_once(tmp_path, tiny_path, tok):
    """The normalisation statistics after train(): per-member mean and std of the rewards of the chosen and rejected
    responses of the first `normalization_samples` eval pairs that fit `max_length` — the eval set as __init__
    prepared it, not tokenized a second time. Checked against each response scored alone (one unpadded row) from
    the chat template's own token ids; a dataset handed to compute_normalization() is still prepared."""
    from trl import RewardTrainer

    train, test = preference_rows(32, 0, True), preference_rows(40, 1, True)

    def ids(row, side):
        return tok.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True)["input_ids"]

    lengths = sorted(max(len(ids(r, "chosen")), len(ids(r, "rejected"))) for r in test)
    limit = sorted(set(lengths))[-2]  # the longest pairs are dropped: the filter matters
    kept = [r for r in test if max(len(ids(r, "chosen")), len(ids(r, "rejected"))) <= limit]
    assert 8 < len(kept) < len(test)
    tr = RewardEnsembleTrainer(tiny_path, args=_quick(tmp_path, ensemble_size=2, max_length=limit,
                                                      normalization_samples=8),
                               train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(test),
                               processing_class=tok)
    prepared = []
    original = RewardTrainer._prepare_dataset
    RewardTrainer._prepare_dataset = lambda self, *a, **k: prepared.append(a[-1]) or original(self, *a, **k)
    try:
        tr.train()
        assert prepared == []  # the eval set was tokenized once, at __init__
        ens = tr.accelerator.unwrap_model(tr.model)
        with torch.no_grad():
            alone = torch.cat([ens.score_ids(torch.tensor([ids(r, side)]), torch.ones(1, len(ids(r, side)),
                                                                                        dtype=torch.long))
                               for r in kept[:8] for side in ("chosen", "rejected")])  # [16, K]
        assert tr.normalization["n"] == 16
        assert tr.normalization["mean"] == pytest.approx(alone.mean(0).tolist(), abs=1e-5)
        assert tr.normalization["std"] == pytest.approx(alone.std(0).tolist(), abs=1e-5)
        again = tr.compute_normalization(Dataset.from_list(test[::-1]))  # given a raw dataset: prepared, filtered
        assert prepared == ["reference"] and again["n"] == 16
        last = [r for r in test[::-1] if r in kept][:8]
        with torch.no_grad():
            alone = torch.cat([ens.score_ids(torch.tensor([ids(r, side)]), torch.ones(1, len(ids(r, side)),
                                                                                        dtype=torch.long))
                               for r in last for side in ("chosen", "rejected")])
        assert again["mean"] == pytest.approx(alone.mean(0).tolist(), abs=1e-5)
    finally:
        RewardTrainer._prepare_dataset = original


def test_reviewed_pairs_that_max_length_drops_are_counted(tmp_path, tiny_path, tok):
    """TRL drops pairs over max_length without a word; a pair a reviewer labelled (here counted 3 times) is named
    when it goes, and the rows that trained carry no trace of the mark."""
    extra = tmp_path / "preferences.jsonl"
    rows = preference_rows(3, 9, conversational=False)
    rows[1]["chosen"] = "word " * 80  # far past max_length
    extra.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = Dataset.from_list(preference_rows(16, 0, conversational=False))
    args = _quick(tmp_path, extra_preferences=[str(extra)], extra_preferences_weight=3, max_length=48)
    with pytest.warns(UserWarning, match=r"max_length=48 drops 1 of the 3 reviewed pair\(s\) from extra_preferences"):
        tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=data, processing_class=tok)
    assert len(tr.train_dataset) == 16 + 2 * 3 and "_rlhf_ext_extra_preference" not in tr.train_dataset.column_names
    tr.train()  # the collator never sees the mark


@pytest.mark.parametrize("reentrant", [None, False, True])
def test_heads_only_with_lora_keeps_the_trunk_out_of_the_graph(tmp_path, tiny_path, tok, pref_data, reentrant):
    """heads_only with a LoRA config (the shipped sentiment recipe's setting): the member's forward ran with its adapter
    unfrozen (PEFT's set_adapter), so each step back-propagated through the frozen trunk for nothing, and under
    non-reentrant activation checkpointing (the default one) the first step failed with torch's CheckpointError."""
    from rlhf_ext.adapters import active_adapter

    args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=8, heads_only=True, ensemble_size=2,
                     gradient_checkpointing=True, lora_top_layers=1, cache_frozen_layers=True,
                     gradient_checkpointing_kwargs=None if reentrant is None else {"use_reentrant": reentrant})
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=pref_data[0], processing_class=tok,
                               peft_config=LoraConfig(**LORA))
    with active_adapter(tr.model.model, tr.model.adapters[0]):
        assert not [n for n, p in tr.model.model.named_parameters() if p.requires_grad]
    heads = {n: p.detach().clone() for n, p in tr.model.heads.named_parameters()}
    tr.train()
    assert all(not torch.equal(p, heads[n]) for n, p in tr.model.heads.named_parameters())
    assert all(torch.all(p == 0) for n, p in tr.model.model.named_parameters() if "lora_B" in n)


def test_a_quantized_trunk_without_lora_is_refused_unless_heads_only(tmp_path, tiny4_path, tok, pref_data):
    """A 4-bit base without peft_config: the whole trunk would train (transformers' Trainer refuses a purely quantised
    model; here torch failed with 'only Tensors of floating point dtype can require gradients'). heads_only trains the
    heads on it, and its artifact (the 4-bit trunk saved whole) reloads to the scores it trained to."""
    from rlhf_ext.models import load_model

    with pytest.raises(ValueError, match="peft_config=LoraConfig.*heads_only=True"):
        RewardEnsembleTrainer(tiny4_path, args=make_args(tmp_path, max_steps=1), train_dataset=pref_data[0],
                              processing_class=tok, load_in_4bit=True)
    with pytest.raises(ValueError, match="peft_config=LoraConfig.*heads_only=True"):  # a 4-bit model object alike
        RewardEnsembleTrainer(load_model(tiny4_path, "trunk", load_in_4bit=True), args=make_args(tmp_path, max_steps=1),
                              train_dataset=pref_data[0], processing_class=tok)
    tr = RewardEnsembleTrainer(tiny4_path, args=make_args(tmp_path, max_steps=2, heads_only=True), load_in_4bit=True,
                               train_dataset=pref_data[0], processing_class=tok)
    tr.train()
    tr.save_model(str(tmp_path / "art"))
    rows = pref_data[1].select(range(6))
    trained = tr.model.score_texts(rows["prompt"], rows["chosen"])
    again = load_reward_model(str(tmp_path / "art")).score_texts(rows["prompt"], rows["chosen"])
    assert torch.allclose(again, trained, atol=1e-6), (again - trained).abs().max()


def test_lora_top_layers_without_lora_is_refused(tmp_path, tiny_path, tok, pref_data):
    with pytest.raises(ValueError, match="lora_top_layers=1 .*no peft_config: the whole trunk would train"):
        RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path, lora_top_layers=1, cache_frozen_layers=True),
                              train_dataset=pref_data[0], processing_class=tok)
    with pytest.raises(ValueError, match="lora_top_layers=1 .*heads_only trains no trunk layer"):
        RewardEnsembleTrainer(tiny_path, args=make_args(tmp_path, lora_top_layers=1, heads_only=True),
                              train_dataset=pref_data[0], processing_class=tok)
