"""RewardEnsembleTrainer where an optimizer step, an evaluation or the end of training meets the ensemble: the
bootstrap-weighted loss independent of how a step is split, eval metrics over every pair, predict() not leaking into
evaluate(), load_best_model_at_end loading the best artifact, extra_preferences keeping margins, a resume with other
ensemble settings named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset

from rlhf_ext.integrity import load_safetensors

from .conftest import preference_rows
from .test_reward_resume import _trainer, _weights


@pytest.mark.parametrize("evaluating", [False, True], ids=["plain", "evaluated-between-steps"])
def test_bootstrap_weighted_loss_does_not_depend_on_how_a_step_is_split(tmp_path, tiny_path, tok, evaluating):
    """K=2 with bootstrap: the same 8 pairs per optimizer step as one batch or as two micro-batches of 4 give the same
    training (each member's weighted mean over the whole step): they were 0.11 apart. Also after an evaluation, which
    leaves the model in eval mode when the next step's batches are fetched."""
    runs = {}
    ev = dict(eval_rows=8, eval_strategy="steps", eval_steps=1) if evaluating else {}
    for name, kw in {"one": dict(per_device_train_batch_size=8),
                     "accumulated": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2)}.items():
        tr = _trainer(tmp_path / name, tiny_path, tok, rows=16, ensemble_size=2, bootstrap=True, save_strategy="no",
                      max_steps=3, **ev, **kw)
        tr.train()
        runs[name] = _weights(tr)
    one, acc = runs["one"], runs["accumulated"]
    assert max((one[k] - acc[k]).abs().max().item() for k in one) < 1e-5


def test_eval_metrics_cover_every_pair_and_predict_does_not_leak(tmp_path, tiny_path, tok):
    """13 eval pairs in batches of 4: compute_metrics gets all 26 responses ([2N, K]) and eval_length_pearson is the
    whole set's Pearson; a predict() on other pairs in between leaves the next evaluate() as it was."""
    from peft import LoraConfig

    from rlhf_ext import RewardEnsembleTrainer

    from .test_reward_resume import _args

    seen = []

    def metrics(pred):
        seen.append(np.asarray(pred.predictions))
        return {}

    tr = RewardEnsembleTrainer(tiny_path, args=_args(tmp_path, ensemble_size=2, save_strategy="no",
                                                     per_device_eval_batch_size=4),
                               train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               eval_dataset=Dataset.from_list(preference_rows(13, 1)), processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj"]), compute_metrics=metrics)
    first = tr.evaluate()
    assert seen[-1].shape[1] == 2  # rows: transformers trims the last batch's [2B, K] by pairs, as for TRL (README)
    tr.predict(tr.eval_dataset.select(range(8, 13)))  # 5 other pairs: their batch metrics used to stay behind
    again = tr.evaluate()
    for k in ("eval_accuracy", "eval_accuracy_ensemble", "eval_length_pearson", "eval_loss", "eval_margin"):
        assert again[k] == pytest.approx(first[k]), k
    # independent: every response scored in one batch, Pearson of the member mean with the response length over all
    # 26 (the last batch's second pair was lost: 0.2547 against 0.2519)
    model = tr.accelerator.unwrap_model(tr.model).eval()
    batch = tr.data_collator([tr.eval_dataset[i] for i in range(13)])
    with torch.no_grad():
        r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float().mean(-1).double()
    x, y = r - r.mean(), batch["response_length"].double() - batch["response_length"].double().mean()
    assert len(r) == 26 and first["eval_length_pearson"] == pytest.approx(float((x * y).sum() / (x.norm() * y.norm())),
                                                                         abs=1e-5)


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path, tiny_path, tok):
    """transformers' loader looks for model.safetensors / adapter_model.* and skipped our artifact with a log line:
    training ended on the last step's weights."""
    tr = _trainer(tmp_path, tiny_path, tok, rows=32, eval_rows=8, max_steps=4, learning_rate=5e-2,
                  eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                  greater_is_better=True)  # "best" = the highest loss: an early checkpoint, not the last one
    evals = {}
    tr.train()
    for h in tr.state.log_history:
        if "eval_loss" in h:
            evals[h["step"]] = h["eval_loss"]
    best = max(evals, key=evals.get)
    assert best < 4 and tr.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    saved = load_safetensors(tmp_path / f"checkpoint-{best}" / "heads.safetensors", "test")
    heads = tr.accelerator.unwrap_model(tr.model).heads
    for key, value in saved.items():
        name, param = key.split(".", 1)
        assert torch.equal(heads[name].state_dict()[param], value), key
    assert tr.evaluate()["eval_loss"] == pytest.approx(evals[best], rel=1e-5)
    again = _trainer(tmp_path, tiny_path, tok, rows=32, eval_rows=8, max_steps=4, learning_rate=5e-2,
                     eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                     greater_is_better=True)
    again.train(resume_from_checkpoint=True)  # finished: nothing trains, and it ends on the best weights as the run did
    assert again.evaluate()["eval_loss"] == pytest.approx(evals[best], rel=1e-5)


def test_extra_preferences_keep_the_training_sets_margins(tmp_path, tiny_path, tok):
    """The review page writes no margin column; the training set's margins were dropped for every pair."""
    from rlhf_ext.data import with_extra_preferences

    extra = tmp_path / "preferences.jsonl"
    extra.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                             for r in preference_rows(3, 5)))
    base = Dataset.from_list(preference_rows(6, 0, margin=True))
    both = with_extra_preferences(base, [str(extra)])
    assert both["margin"] == [0.5] * 6 + [0.0] * 3


def test_resuming_with_other_ensemble_settings_names_the_setting(tmp_path, tiny_path, tok):
    """A K=2 checkpoint resumed with K=3 gave torch's bare "size mismatch"."""
    _trainer(tmp_path, tiny_path, tok, rows=16, ensemble_size=2, max_steps=1).train()
    again = _trainer(tmp_path, tiny_path, tok, rows=16, ensemble_size=3, max_steps=2)
    with pytest.raises(ValueError, match=r"checkpoint-1 was saved with members = .*Resume with the settings"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def _pearson(x, y):
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


SHARED_OPENING = [  # responses that open alike: their common words are the response's, not the prompt's
    ("the movie was good and fun and the music was great .", "the movie was bad ."),
    ("a nice story .", "a bad plot and awful actors ."),
    ("the book was wonderful .", "the book was boring and sad and too long ."),
    ("i love this song .", "i hate it ."),
    ("it was fine and the actor was good .", "it was poor ."),
    ("great .", "the worst film ."),
    ("the food was excellent .", "the food was awful and cold ."),
]


def test_response_lengths_and_eval_length_corr_are_the_responses_own(tmp_path, tiny_path, tok):
    """The response length the length de-correlation and `length_corr` read was the tokens after the prefix chosen
    and rejected share — which took a response's opening words shared with its rival for prompt: 'the movie was good
    and fun …' (14 tokens) counted 8. And `eval_length_corr` was a mean of per-batch correlations (a one-pair batch
    counted as 0), where the README says over every pair of the set. Both against independent counts here."""
    from peft import LoraConfig

    from rlhf_ext import RewardEnsembleTrainer

    from .test_reward_resume import _args

    rows = [{"prompt": f"write a short review of the {w} . ", "chosen": c, "rejected": r}
            for w, (c, r) in zip(["movie", "book", "song", "film"] * 2, SHARED_OPENING)]
    tr = RewardEnsembleTrainer(tiny_path, args=_args(tmp_path, ensemble_size=2, save_strategy="no",
                                                     per_device_eval_batch_size=3),
                               train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    eos = tok.eos_token
    want = [len(tok(text=row[side] + eos)["input_ids"]) for side in ("chosen", "rejected") for row in rows]
    batch = tr.data_collator([tr.eval_dataset[i] for i in range(len(rows))])
    assert batch["response_length"].tolist() == want
    metrics = tr.evaluate()
    model = tr.accelerator.unwrap_model(tr.model).eval()
    with torch.no_grad():  # each response alone, no padding: [2N, K]
        ids = [torch.tensor([tok(text=row["prompt"] + row[side] + eos)["input_ids"]])
               for side in ("chosen", "rejected") for row in rows]
        scores = torch.cat([model(input_ids=x, attention_mask=torch.ones_like(x)) for x in ids]).double()
    corr = sum(_pearson(scores[:, k], want) for k in range(2)) / 2
    assert metrics["eval_length_corr"] == pytest.approx(corr, abs=1e-5)
    assert metrics["eval_length_pearson"] == pytest.approx(_pearson(scores.mean(-1), want), abs=1e-5)


def test_a_pair_id_column_of_the_users_is_not_taken_for_row_numbers(tmp_path, tiny_path, tok):
    """A dataset with its own `pair_id` (ids 1000…, which TRL never reads) crashed the first step: the ids indexed the
    bootstrap table. Trains as without the column."""
    from peft import LoraConfig

    from rlhf_ext import RewardEnsembleTrainer

    from .test_reward_resume import _args

    rows = [{**row, "pair_id": 1000 + i} for i, row in enumerate(preference_rows(16, 0))]
    with_ids = RewardEnsembleTrainer(tiny_path, args=_args(tmp_path / "b", ensemble_size=2, max_steps=2,
                                                           save_strategy="no"),
                                     train_dataset=Dataset.from_list(rows), processing_class=tok,
                                     peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    with_ids.train()
    plain = RewardEnsembleTrainer(tiny_path, args=_args(tmp_path / "c", ensemble_size=2, max_steps=2,
                                                        save_strategy="no"),
                                  train_dataset=Dataset.from_list(preference_rows(16, 0)), processing_class=tok,
                                  peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    plain.train()
    a, b = _weights(with_ids), _weights(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_length_decorrelation_at_batch_size_one_says_it_does_nothing(tmp_path, tiny_path, tok):
    with pytest.warns(UserWarning, match=r"over one pair's two responses it is ±1 or 0, with no gradient"):
        _trainer(tmp_path, tiny_path, tok, per_device_train_batch_size=1, length_decorrelation_coef=0.3)
