"""Sequence-classification reward models with their own tokenizers (`ExternalRewardModel`): encoders (BERT WordPiece,
RoBERTa BPE, DeBERTa-v2 Unigram) and causal classifiers (GPT-2 BPE), built tiny in code from vocab files written in
tmp_path — the text each scores, its positions, its label column, and a tokenizer that is not its own."""

import json
import warnings

import pytest
import torch

from rlhf_ext.reward.pipeline import ExternalRewardModel
from rlhf_ext.testing import WORDS

PROMPT, COMPLETION = "describe your day .", " a wonderful day with my dog ."
SENTS = ["the movie was very good and i love it .", "the film was bad , awful and boring !", PROMPT + COMPLETION]


# ------------------------------------------------------------------------------------------------ tiny tokenizers
def wordpiece_tokenizer(tmp_path):
    """BERT's WordPiece: [CLS] … [SEP], no eos_token. (transformers 5 ignores `vocab_file=`: the vocab goes in.)"""
    from transformers import BertTokenizerFast

    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))) + "\n")
    vocab = {t: i for i, t in enumerate(path.read_text().split())}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def _bpe_files(tmp_path, specials):
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path / f"bpe_{len(specials)}"
    folder.mkdir(exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTS * 5 + [" ".join(WORDS)] * 5, vocab_size=400, min_frequency=1, special_tokens=specials)
    bpe.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split(" ")) for line in (folder / "merges.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    return vocab, merges


def roberta_tokenizer(tmp_path):
    """RoBERTa's byte-level BPE: <s> … </s>, eos_token '</s>' (its own closing token)."""
    from transformers import RobertaTokenizerFast

    return RobertaTokenizerFast(*_bpe_files(tmp_path, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))


def gpt2_tokenizer(tmp_path):
    """GPT-2's byte-level BPE: no special token added, eos = '<|endoftext|>' appended as text (as TRL trains it)."""
    from transformers import GPT2TokenizerFast

    vocab, merges = _bpe_files(tmp_path, ["<|endoftext|>"])
    return GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>")


def deberta_tokenizer(tmp_path=None):
    """DeBERTa-v2/v3's SentencePiece-like Unigram: [CLS] … [SEP], eos_token '[SEP]'."""
    from transformers import DebertaV2Tokenizer

    vocab = ([(t, 0.0) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]]
             + [("\u2581" + w, -1.0) for w in sorted(set(WORDS))] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz.,!?"])
    return DebertaV2Tokenizer(vocab=vocab)


TOKENIZERS = {"bert": wordpiece_tokenizer, "distilbert": wordpiece_tokenizer, "roberta": roberta_tokenizer,
              "deberta-v2": deberta_tokenizer, "gpt2": gpt2_tokenizer}


# ------------------------------------------------------------------------------------------------ tiny classifiers
def classifier(kind, tok, num_labels=1, max_pos=512, seed=0):
    """A tiny sequence classifier of `kind` for `tok`, its head large and random (so any change of input shows)."""
    import transformers as T

    torch.manual_seed(seed)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    common = dict(vocab_size=len(tok), num_labels=num_labels, pad_token_id=tok.pad_token_id)
    if kind == "roberta":  # positions start after the padding index: max_pos - pad - 1 usable
        model = T.RobertaForSequenceClassification(T.RobertaConfig(
            max_position_embeddings=max_pos, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            **small, **common))
    elif kind == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(max_position_embeddings=max_pos, **small, **common))
    elif kind == "distilbert":
        model = T.DistilBertForSequenceClassification(T.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=max_pos, **common))
    elif kind == "deberta-v2":
        model = T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
            max_position_embeddings=max_pos, relative_attention=True, position_buckets=32, max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"], **small, **common))
    elif kind == "gpt2":
        model = T.GPT2ForSequenceClassification(T.GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=max_pos, num_labels=num_labels,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "classifier" in name or "score" in name:
                p.normal_(0, 1.0)
    if num_labels == 2:
        model.config.id2label, model.config.label2id = {0: "NEGATIVE", 1: "POSITIVE"}, {"NEGATIVE": 0, "POSITIVE": 1}
    return model.eval()


def own_score(model, tok, text, label=0):
    """The classifier's own score of `text`, as a pipeline / Trainer-fine-tuned classifier sees it."""
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0, label].item()


# ------------------------------------------------------------------------------------------------ 1. the tokenizer
def test_folder_saved_without_tokenizer_is_refused(tmp_path):
    """model.save_pretrained() alone: transformers 5's AutoTokenizer returns an empty tokenizer (every text → no ids)
    instead of raising; scoring with it would give one constant reward. Refused where it is loaded and where an
    ExternalRewardModel gets it, naming how to pass the right one."""
    from transformers import AutoTokenizer

    from rlhf_ext.models import load_tokenizer

    tok = gpt2_tokenizer(tmp_path)
    model = classifier("gpt2", tok)
    model.save_pretrained(tmp_path / "rm")
    empty = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert empty(PROMPT + COMPLETION, add_special_tokens=False)["input_ids"] == []  # the premise
    with pytest.raises(ValueError, match=r"no tokenizer files.*tokenizer\.save_pretrained"):
        load_tokenizer(str(tmp_path / "rm"))
    with pytest.raises(ValueError, match=r"not this model's tokenizer.*reward_processing_classes"):
        ExternalRewardModel(model, empty)


def test_tokenizer_far_smaller_than_the_embedding_is_refused(tmp_path):
    """A WordPiece tokenizer built from `vocab_file=` alone (transformers 5 ignores it: 5 special tokens, every word
    [UNK]) beside a 100+-row embedding: not the model's tokenizer."""
    from transformers import BertTokenizerFast

    tok = wordpiece_tokenizer(tmp_path)
    model = classifier("bert", tok)
    broken = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    assert len(broken) < 10 < len(tok)  # the premise
    with pytest.raises(ValueError, match=r"5 tokens.*embedding has \d+ rows.*reward_processing_classes"):
        ExternalRewardModel(model, broken)
    ExternalRewardModel(model, tok)  # its own: fine


# ------------------------------------------------------------------------------------------------ 2. the label
def test_multi_label_classifier_needs_a_label_and_scores_its_column(tmp_path):
    tok = roberta_tokenizer(tmp_path)
    model = classifier("roberta", tok, num_labels=2)
    with pytest.raises(ValueError, match=r"2 labels.*NEGATIVE.*POSITIVE.*label="):
        ExternalRewardModel(model, tok)
    text = PROMPT + COMPLETION
    for label in ("POSITIVE", "positive", 1):
        got = ExternalRewardModel(model, tok, label=label).score_completions([PROMPT], [COMPLETION])
        assert got.shape == (1, 1) and got.item() == pytest.approx(own_score(model, tok, text, 1), abs=1e-5)
    assert ExternalRewardModel(model, tok, label="NEGATIVE")([PROMPT], [COMPLETION]).item() == pytest.approx(
        own_score(model, tok, text, 0), abs=1e-5)
    with pytest.raises(ValueError, match=r"label 'NEUTRAL'.*NEGATIVE.*POSITIVE"):
        ExternalRewardModel(model, tok, label="NEUTRAL")
    with pytest.raises(ValueError, match=r"label 2.*2 labels"):
        ExternalRewardModel(model, tok, label=2)


# ------------------------------------------------------------------------------------------------ 3. the text
@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "deberta-v2"])
def test_encoder_scores_the_text_as_its_tokenizer_encodes_it(tmp_path, kind):
    """An encoder's tokenizer closes every text with its own [SEP] / </s> (BERT's has no eos_token at all): the
    reward scores `tokenizer(prompt + completion)`, not the text with its EOS appended once more ([SEP] [SEP])."""
    tok = TOKENIZERS[kind](tmp_path)
    model = classifier(kind, tok)
    ext = ExternalRewardModel(model, tok)
    expected = tok(PROMPT + COMPLETION)["input_ids"]
    assert ext.input_ids([PROMPT], [COMPLETION]) == [expected]
    got = ext.score_completions([PROMPT], [COMPLETION]).item()
    assert got == pytest.approx(own_score(model, tok, PROMPT + COMPLETION), abs=1e-5)


def test_causal_classifier_keeps_the_eos_trl_trains_with(tmp_path):
    """A GPT-2 classifier (trl.RewardTrainer appends the EOS as text; its tokenizer adds nothing): unchanged."""
    tok = gpt2_tokenizer(tmp_path)
    ext = ExternalRewardModel(classifier("gpt2", tok), tok)
    assert ext.input_ids([PROMPT], [COMPLETION]) == [tok(PROMPT + COMPLETION + tok.eos_token)["input_ids"]]


# ------------------------------------------------------------------------------------------------ 4. the positions
@pytest.mark.parametrize("kind,max_pos,usable", [("roberta", 34, 32), ("deberta-v2", 32, 32), ("bert", 32, 32),
                                                 ("gpt2", 32, 32)])
def test_input_longer_than_the_positions_keeps_its_end(tmp_path, kind, max_pos, usable):
    """Prompt + completion past the model's positions (RoBERTa's start after its padding index) is cut from the left
    to fit, as RewardEnsemble cuts to its max_length — the completion's end kept, the leading [CLS] / <s> too (an
    encoder pools it) — with one warning, instead of an index error inside transformers."""
    tok = TOKENIZERS[kind](tmp_path)
    model = classifier(kind, tok, max_pos=max_pos)
    ext = ExternalRewardModel(model, tok)
    long = " " + " ".join(WORDS[20:80]) + " ."
    full = ext.input_ids([PROMPT], [long])[0]
    assert len(full) > usable  # the premise
    lead = 1 if kind != "gpt2" else 0
    expected = full[:lead] + full[len(full) - (usable - lead):]
    with pytest.warns(UserWarning, match=rf"longer than the reward model's {usable} positions.*last {usable} tokens"):
        got = ext.score_completions([PROMPT, PROMPT], [long, COMPLETION])
    with torch.no_grad():
        own = model(input_ids=torch.tensor([expected])).logits[0, 0].item()
    assert got[0].item() == pytest.approx(own, abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        ext.score_completions([PROMPT], [long])


def test_tokenizer_model_max_length_below_the_positions_is_the_limit(tmp_path):
    tok = deberta_tokenizer()
    tok.model_max_length = 12
    ext = ExternalRewardModel(classifier("deberta-v2", tok), tok)
    with pytest.warns(UserWarning, match="12 positions"):
        ext.score_completions([PROMPT], [" " + " ".join(WORDS[20:60])])
    assert ext.max_length == 12
