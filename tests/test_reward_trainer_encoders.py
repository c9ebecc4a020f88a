"""RewardEnsembleTrainer on encoder sequence classifiers (BERT, DistilBERT, DeBERTa-v2: [CLS] pooling, a head with a
bias, a WordPiece tokenizer without EOS) and on heads with a bias in general."""

import pytest
import torch
from datasets import Dataset
from torch import nn

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.adapters import check_gradients_reached

from .conftest import preference_rows
from .test_external_reward_models import classifier, deberta_tokenizer, wordpiece_tokenizer


def _args(tmp_path, **kw):
    return RewardEnsembleConfig(str(tmp_path / "out"), **{
        "per_device_train_batch_size": 8, "max_steps": 1, "learning_rate": 1e-3, "report_to": [], "use_cpu": True,
        "save_strategy": "no", "bf16": False, "normalization_samples": 8, "overwrite_output_dir": True, **kw})


def _text_pairs(n=16):
    return Dataset.from_list(preference_rows(n, 0, conversational=False))


# ------------------------------------------------------------------------------------------------ 5. head bias
def test_a_bias_without_gradient_is_not_a_detached_graph():
    """Bradley–Terry depends on r_chosen − r_rejected only: a head's bias cancels and its gradient is exactly 0.
    The first-step reach check must not read that as a detached graph; a weight without gradient still is one."""
    w, b = nn.Parameter(torch.ones(1, 4)), nn.Parameter(torch.zeros(1))
    w.grad, b.grad = torch.full_like(w, 0.1), torch.zeros_like(b)
    check_gradients_reached({"heads.full.weight": w, "heads.full.bias": b}, "RewardEnsembleTrainer")
    w.grad = torch.zeros_like(w)
    with pytest.raises(RuntimeError, match="1 of 1 adapter matrices received no gradient.*heads.full.weight"):
        check_gradients_reached({"heads.full.weight": w, "heads.full.bias": b}, "RewardEnsembleTrainer")


def test_checkpoint_head_with_a_bias_trains(tmp_path, tok):
    """A causal seq-cls checkpoint whose kept score head has a bias: the first step's check passes (it stopped
    training with 'a detached graph (gradient checkpointing …)' before)."""
    from transformers import LlamaForSequenceClassification

    from rlhf_ext.testing import tiny_config

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))
    rm.score = nn.Linear(rm.config.hidden_size, 1, bias=True)
    with torch.no_grad():
        rm.score.bias.fill_(0.5)
    tr = RewardEnsembleTrainer(rm, args=_args(tmp_path), train_dataset=_text_pairs(), processing_class=tok)
    assert tr.head_init == "checkpoint" and tr.model.heads["full"].bias is not None
    tr.train()
    assert tr.state.global_step == 1


# ------------------------------------------------------------------------------------------------ 6. encoder heads
@pytest.mark.parametrize("kind", ["distilbert", "bert", "deberta-v2"])
def test_encoder_checkpoint_head_is_not_claimed_as_kept(tmp_path, kind):
    """An encoder classifier scores its [CLS] position through a pooler (DeBERTa's ContextPooler, BERT's pooler,
    DistilBERT's pre_classifier); the ensemble's heads read the last token's final hidden state, so the checkpoint's
    `classifier` would score something it never saw. It is not used, and a warning says so (new heads train)."""
    tok = deberta_tokenizer() if kind == "deberta-v2" else wordpiece_tokenizer(tmp_path)
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token
    model = classifier(kind, tok)
    with pytest.warns(UserWarning, match=r"does not score the last token.*not used.*new heads"):
        tr = RewardEnsembleTrainer(model, args=_args(tmp_path), train_dataset=_text_pairs(), processing_class=tok)
    assert tr.head_init == "random"
    tr.train()


def test_causal_checkpoint_head_is_still_kept_without_warning(tmp_path):
    """The check behind the warning above leaves a causal classifier's head (what the last token scores) kept."""
    import warnings

    from rlhf_ext.testing import tiny_tokenizer

    from .test_reward_trainer import _seq_cls

    tok = tiny_tokenizer()
    tok.pad_token = "<|endoftext|>"  # pad != EOS: no warning about the scoring position either
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = RewardEnsembleTrainer(_seq_cls(tok, score=10.0), args=_args(tmp_path), train_dataset=_text_pairs(),
                                   processing_class=tok)
    assert tr.head_init == "checkpoint"
    assert not [w for w in caught if "last token" in str(w.message)]


# ------------------------------------------------------------------------------------------------ 7. no EOS
def test_text_pairs_with_a_tokenizer_without_eos_are_refused_up_front(tmp_path):
    """BERT's WordPiece tokenizer has no eos_token, and TRL appends one to every text pair (a bare TypeError in its
    add_eos). Refused at construction with the fix; pre-tokenised pairs need no EOS and are taken."""
    tok = wordpiece_tokenizer(tmp_path)
    assert tok.eos_token is None  # the premise
    model = classifier("bert", tok)
    with pytest.raises(ValueError, match=r"no eos_token.*tokenizer\.eos_token = tokenizer\.sep_token.*chosen_ids"):
        RewardEnsembleTrainer(model, args=_args(tmp_path), train_dataset=_text_pairs(), processing_class=tok)
    rows = [{"chosen_ids": tok(r["prompt"] + r["chosen"])["input_ids"],
             "rejected_ids": tok(r["prompt"] + r["rejected"])["input_ids"]} for r in _text_pairs(8)]
    RewardEnsembleTrainer(model, args=_args(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=tok)
