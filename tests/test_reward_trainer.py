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
