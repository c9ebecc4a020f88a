"""Conformance with `trl.RewardTrainer`: each documented behaviour of TRL's reward trainer runs against BOTH
`trl.RewardTrainer` and `RewardEnsembleTrainer(ensemble_size=1)`, with the same seed, data and tiny model, so any
difference shows up as a failing pair. Compared: that both run (or raise the same kind of error), the tokenisation
(the same `chosen_ids`/`rejected_ids`), the metric keys TRL logs (ours logs a superset), and — where the maths is the
same — the loss at step 0, the first logged training loss and gradient norm, and the eval predictions.

The model is a sequence-classification checkpoint with num_labels=1 (both trainers then start from the same score
head) and the tokenizer pads with a token that is not its EOS (transformers' seq-cls models score the last non-pad
token; with pad == EOS that is the token before the EOS, see the intentional differences at the end and in
README.md, "Differences from trl.RewardTrainer (intentional)")."""

from __future__ import annotations

import math
import warnings
from itertools import islice

import pytest
import torch
from datasets import Dataset, IterableDataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification
from trl import RewardConfig, RewardTrainer

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.testing import tiny_config, tiny_tokenizer

from .conftest import preference_rows

COMMON = dict(max_steps=1, per_device_train_batch_size=8, per_device_eval_batch_size=8, report_to="none",
              save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, logging_steps=1, seed=0,
              gradient_checkpointing=False, learning_rate=1e-3)
TRAINERS = ("trl", "ours")


def ptok():
    """The tiny tokenizer, padding with <|endoftext|> (not its EOS)."""
    tok = tiny_tokenizer()
    tok.pad_token = "<|endoftext|>"
    return tok


@pytest.fixture(scope="module")
def sc_path(tmp_path_factory):
    """A tiny 'trained' reward model: LlamaForSequenceClassification, num_labels=1, rewards of order 1."""
    tok = ptok()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("parity") / "rm"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def seq_cls(path, **kw):
    return AutoModelForSequenceClassification.from_pretrained(path, **kw)


def make(which, tmp_path, model, train, eval_dataset=None, tok=None, **kw):
    """One trainer of the pair; `model` is a path or a zero-argument factory (each trainer gets a fresh model)."""
    args = {**COMMON, **kw}
    model = model if isinstance(model, str) else model()
    extra = {k: args.pop(k) for k in ("compute_metrics", "peft_config", "optimizers") if k in args}
    if which == "trl":
        cfg = RewardConfig(str(tmp_path / "trl"), **args)
        return RewardTrainer(model, args=cfg, train_dataset=train, eval_dataset=eval_dataset,
                             processing_class=tok or ptok(), **extra)
    cfg = RewardEnsembleConfig(str(tmp_path / "ours"), ensemble_size=1, normalization_samples=8, **args)
    return RewardEnsembleTrainer(model, args=cfg, train_dataset=train, eval_dataset=eval_dataset,
                                 processing_class=tok or ptok(), **extra)


def pair(tmp_path, model, train, eval_dataset=None, **kw):
    return [make(w, tmp_path, model, train, eval_dataset, **kw) for w in TRAINERS]


def rows(tr, n=8):
    ds = tr.train_dataset
    return list(islice(iter(ds), n)) if isinstance(ds, IterableDataset) else [ds[i] for i in range(n)]


def step0(tr, n=8) -> float:
    """The loss of the first n pairs before any update (eval mode, no dropout either way)."""
    batch = tr.data_collator(rows(tr, n))
    tr.model.eval()
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, dict(batch)).item()
    tr.model.train()
    tr._metrics["eval"].clear()
    getattr(tr, "_eval_buffer", {}).clear()
    return loss


def ids(tr, col):
    return [r[col] for r in rows(tr, 16)]


def same_step0(trainers, rel=1e-5):
    a, b = (step0(t) for t in trainers)
    assert a == pytest.approx(b, rel=rel), (a, b)
    return a


def trains(trainers):
    """Both train; TRL's logged training metrics are a subset of ours; first logged losses and grad norms equal."""
    logs = []
    for tr in trainers:
        tr.train()
        logs.append(tr.state.log_history[0])
    (t, o) = logs
    assert math.isfinite(t["loss"]) and math.isfinite(o["loss"])
    assert set(t) <= set(o), set(t) - set(o)
    return t, o


def data(n=16, seed=0, conversational=True, **kw):
    return Dataset.from_list(preference_rows(n, seed, conversational, **kw))


# ------------------------------------------------------------------------------------------- the model argument
def test_model_as_seq_cls_folder(tmp_path, sc_path):
    trainers = pair(tmp_path, sc_path, data())
    same_step0(trainers)
    t, o = trains(trainers)
    assert o["loss"] == pytest.approx(t["loss"], rel=1e-4) and o["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-3)
    assert trainers[1].head_init == "checkpoint"


def test_model_as_causal_lm_folder(tmp_path, tiny_path):
    """A causal LM: both train a new score head. The heads' random init differs (intentional: ours is
    N(0, initializer_range/√H), TRL's N(0, initializer_range)), so the losses agree only near log 2."""
    trainers = pair(tmp_path, tiny_path, data())
    assert all(abs(step0(tr) - math.log(2)) < 0.1 for tr in trainers)
    trains(trainers)
    assert trainers[1].head_init == "random"


def test_model_as_instance(tmp_path, sc_path, tiny_path):
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), data())
    same_step0(trainers)
    trains(trainers)
    for which in TRAINERS:  # a sequence-classification model with two labels: refused by both
        with pytest.raises(ValueError, match="num_labels=1"):
            make(which, tmp_path, lambda: seq_cls(sc_path, num_labels=2, ignore_mismatched_sizes=True), data())
    # intentional: a causal LM instance is refused by TRL (num_labels=2 in its config) but taken by ours (its trunk)
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="num_labels=1"):
        make("trl", tmp_path, lambda: AutoModelForCausalLM.from_pretrained(tiny_path), data())
    assert make("ours", tmp_path, lambda: AutoModelForCausalLM.from_pretrained(tiny_path), data()).head_init == "random"


def test_peft_model(tmp_path, sc_path):
    """A PeftModel: the adapter trains, the base stays bit-identical, in both."""
    models = {}

    def factory(which):
        def build():
            models[which] = get_peft_model(seq_cls(sc_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                         task_type="SEQ_CLS"))
            return models[which]
        return build

    trainers = [make(w, tmp_path, factory(w), data(), learning_rate=1e-2) for w in TRAINERS]
    before = {w: {n: p.detach().clone() for n, p in models[w].named_parameters()} for w in TRAINERS}
    same_step0(trainers)
    trains(trainers)
    for w in TRAINERS:
        after = dict(models[w].named_parameters())
        base = [n for n in after if "lora_" not in n and "modules_to_save" not in n]
        assert base and all(torch.equal(before[w][n], after[n]) for n in base), w
        assert all(not torch.equal(before[w][n], after[n]) for n in after if "lora_B" in n), w
        # intentional: TRL trains the adapter's `score` copy (modules_to_save); ours freezes it, our head scores
        score = [n for n in after if "modules_to_save" in n]
        assert score and all(torch.equal(before[w][n], after[n]) != (w == "trl") for n in score), w
    for which in TRAINERS:  # a PeftModel together with a peft_config: refused by both
        with pytest.raises(ValueError, match="PeftModel.*peft_config"):
            make(which, tmp_path, factory(which), data(), peft_config=LoraConfig(r=4, target_modules=["q_proj"]))


def test_peft_config_types(tmp_path, sc_path):
    """A peft_config that is not a PeftConfig: TRL's TypeError in both. Another PEFT method than LoRA: TRL trains it;
    ours refuses it by name (members are saved and rebuilt as LoRA: a LoHa ensemble trained, then loaded back with
    other scores)."""
    from peft import IA3Config, LoHaConfig

    for which in TRAINERS:
        with pytest.raises(TypeError, match="must be a `peft.PeftConfig` instance"):
            make(which, tmp_path, sc_path, data(), peft_config={"r": 4, "target_modules": ["q_proj"]})
    for cfg in (LoHaConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"]),
                IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])):
        with pytest.raises(ValueError, match=f"peft_config is a {type(cfg).__name__}.*Pass a `peft.LoraConfig`"):
            make("ours", tmp_path, sc_path, data(), peft_config=cfg)


def test_optimizers_built_on_the_model(tmp_path, sc_path):
    """`optimizers=(SGD(model.parameters()), None)`, the usual Trainer call: the same steps as TRL — the model's own
    score head trains (ours kept a copy outside the optimizer: the head never moved). Where the trainer makes heads
    the optimizer cannot hold (K = 2), refused with the fix, not trained without them."""
    models, before = {}, {}

    def build(which):
        models[which] = seq_cls(sc_path)
        before[which] = {n: p.detach().clone() for n, p in models[which].named_parameters()}
        return models[which]

    trainers = []
    for w in TRAINERS:
        model = build(w)
        trainers.append(make(w, tmp_path, lambda: model, data(), max_steps=2,
                             optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None)))
    for tr in trainers:
        tr.train()
    losses = [[h["loss"] for h in tr.state.log_history if "loss" in h] for tr in trainers]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for w in TRAINERS:
        assert not torch.equal(before[w]["score.weight"], models[w].score.weight.detach()), w
    assert torch.allclose(models["trl"].score.weight, models["ours"].score.weight, atol=1e-6)
    model = seq_cls(sc_path)
    with pytest.raises(ValueError, match=r"does not hold 1 parameter.*heads\..*optimizer_cls_and_kwargs"):
        RewardEnsembleTrainer(model, args=RewardEnsembleConfig(str(tmp_path / "k2"), ensemble_size=2, **COMMON),
                              train_dataset=data(), processing_class=ptok(),
                              optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None))


def test_deprecated_pad_token_field(tmp_path, sc_path):
    """TRL's deprecated `RewardConfig(pad_token=...)`: the batches pad with it in both (ours padded with the
    tokenizer's old pad token: its collator was built before TRL set the new one)."""
    trainers = pair(tmp_path, sc_path, data(), pad_token="[UNK]")  # neither EOS nor the tokenizer's pad
    pads = []
    for tr in trainers:
        batch = tr.data_collator(rows(tr, 8))
        pads.append(set(batch["input_ids"][batch["attention_mask"] == 0].tolist()))
    want = trainers[0].processing_class.convert_tokens_to_ids("[UNK]")
    assert pads[0] == pads[1] == {want}
    same_step0(trainers)


# ------------------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("conversational", [True, False], ids=["conversational", "standard"])
@pytest.mark.parametrize("prompt", ["explicit", "implicit"])
def test_data_formats(tmp_path, sc_path, conversational, prompt):
    ds = data(conversational=conversational)
    if prompt == "implicit":
        ds = ds.map(lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
                    remove_columns=["prompt"])
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), ds)
    for col in ("chosen_ids", "rejected_ids"):
        assert ids(trainers[0], col) == ids(trainers[1], col)
    same_step0(trainers)
    trains(trainers)


@pytest.mark.parametrize("names", [("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")],
                         ids=["current", "legacy"])
def test_pretokenised(tmp_path, sc_path, names):
    tok = ptok()
    ds = data(conversational=False).map(lambda r: {names[0]: tok(r["prompt"] + r["chosen"] + tok.eos_token)["input_ids"],
                                                   names[1]: tok(r["prompt"] + r["rejected"] + tok.eos_token)["input_ids"]},
                                        remove_columns=["prompt", "chosen", "rejected"])
    trainers = []
    for which in TRAINERS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainers.append(make(which, tmp_path, lambda: seq_cls(sc_path), ds))
        legacy = [w for w in caught if issubclass(w.category, FutureWarning) and "will not be supported in v1" in str(w.message)]
        assert bool(legacy) == (names[0] == "chosen_input_ids"), which
    for tr in trainers:
        assert {"chosen_ids", "rejected_ids"} <= set(tr.train_dataset.column_names)
        assert not {"chosen_input_ids", "rejected_input_ids"} & set(tr.train_dataset.column_names)
    assert ids(trainers[0], "chosen_ids") == ids(trainers[1], "chosen_ids") == ds[names[0]]
    same_step0(trainers)
    trains(trainers)


def stream(ds):
    def gen():
        yield from ds

    return IterableDataset.from_generator(gen)


def test_streaming(tmp_path, sc_path):
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), stream(data()), eval_dataset=stream(data(8, 1)), max_steps=2)
    for col in ("chosen_ids", "rejected_ids"):
        assert ids(trainers[0], col) == ids(trainers[1], col)
    same_step0(trainers)
    trains(trainers)
    t, o = (tr.evaluate() for tr in trainers)
    assert set(t) <= set(o) and o["eval_loss"] == pytest.approx(t["eval_loss"], rel=1e-4)
    assert trainers[1].normalization["n"] == 16  # intentional extra: per-member statistics after training


def test_eval_dataset_dict(tmp_path, sc_path):
    evals = {"a": data(8, 1), "b": data(8, 2, conversational=True)}
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), data(), eval_dataset=evals)
    t, o = (tr.evaluate() for tr in trainers)
    assert {"eval_a_loss", "eval_b_loss"} <= set(t) and set(t) <= set(o), set(t) - set(o)
    for k in ("eval_a_loss", "eval_b_loss"):
        assert o[k] == pytest.approx(t[k], rel=1e-5)
    assert "eval_b_accuracy_ensemble" in o  # our whole-set metrics, per eval set


def test_evaluate_accepts_a_raw_dataset(tmp_path, sc_path):
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), data())
    t, o = (tr.evaluate(eval_dataset=data(8, 3)) for tr in trainers)
    assert o["eval_loss"] == pytest.approx(t["eval_loss"], rel=1e-5) and set(t) <= set(o)


# --------------------------------------------------------------------------------------------------- the loss
def test_args_as_trl_reward_config(tmp_path, sc_path):
    """`args=trl.RewardConfig(...)`, as trl.RewardTrainer documents it: ours read it as a RewardEnsembleConfig with
    those settings and one member (it raised TypeError), and trains as TRL does from the same config."""
    cfg = RewardConfig(str(tmp_path / "cfg"), **COMMON)
    ours = RewardEnsembleTrainer(sc_path, args=cfg, train_dataset=data(), processing_class=ptok())
    theirs = RewardTrainer(sc_path, args=cfg, train_dataset=data(), processing_class=ptok())
    assert isinstance(ours.args, RewardEnsembleConfig) and ours.args.ensemble_size == 1
    assert {k: getattr(ours.args, k) for k in ("learning_rate", "max_steps", "per_device_train_batch_size", "seed")} \
        == {k: getattr(cfg, k) for k in ("learning_rate", "max_steps", "per_device_train_batch_size", "seed")}
    same_step0([theirs, ours])
    t, o = trains([theirs, ours])
    assert o["loss"] == pytest.approx(t["loss"], rel=1e-4) and o["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-3)


def test_a_trl_reward_config_is_the_trainers_args(tmp_path, sc_path):
    """`trainer.args is args` with a trl.RewardConfig too, as in TRL: ours read a copy, so raising `max_steps` on the
    config and resuming trained nothing ("Nothing to train: … this run trains 2 steps") where TRL trains on to 4."""
    out = {}
    for which, cls in (("trl", RewardTrainer), ("ours", RewardEnsembleTrainer)):
        cfg = RewardConfig(str(tmp_path / which), **{**COMMON, "max_steps": 2, "per_device_train_batch_size": 4,
                                                     "save_strategy": "steps", "save_steps": 1})
        tr = cls(sc_path, args=cfg, train_dataset=data(), processing_class=ptok())
        assert tr.args is cfg
        tr.train()
        cfg.max_steps = 4
        tr.train(resume_from_checkpoint=True)
        out[which] = [(h["step"], h["learning_rate"], round(h["loss"], 4)) for h in tr.state.log_history if "loss" in h]
    assert out["ours"] == out["trl"] and out["ours"][-1][0] == 4


def test_parameters_in_trls_order():
    """A positional call means what it means to trl.RewardTrainer: its parameters, in its order, then ours (before,
    a seventh positional argument — TRL's compute_metrics — became our peft_config)."""
    import inspect

    theirs = list(inspect.signature(RewardTrainer.__init__).parameters)
    ours = list(inspect.signature(RewardEnsembleTrainer.__init__).parameters)
    assert ours[: len(theirs)] == theirs, (theirs, ours)


def test_margin(tmp_path, sc_path):
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), data(margin=True))
    loss = same_step0(trainers)
    plain = step0(make("trl", tmp_path, lambda: seq_cls(sc_path), data()))
    assert loss > plain  # the margin is in the loss
    trains(trainers)


def test_total_flos(tmp_path, sc_path):
    """Trainer's `total_flos` (the run's last log entry, trainer_state.json): 6 × input tokens × the model's
    non-embedding parameters, as for TRL's model. Ours logged 0 (RewardEnsemble had no `num_parameters`)."""
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), data(), max_steps=2)
    for tr in trainers:
        tr.train()
    theirs, ours = (tr.state.log_history[-1]["total_flos"] for tr in trainers)
    assert theirs > 0 and ours == pytest.approx(theirs, rel=1e-9)
    ens = trainers[1].model
    assert ens.num_parameters(exclude_embeddings=True) == trainers[0].model.num_parameters(exclude_embeddings=True)


def test_center_rewards_coefficient(tmp_path, sc_path):
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), data(), center_rewards_coefficient=0.3)
    loss = same_step0(trainers)
    assert loss > step0(make("trl", tmp_path, lambda: seq_cls(sc_path), data()))
    trains(trainers)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(tmp_path, sc_path, reentrant):
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), data(), gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    t, o = trains(trainers)
    assert o["loss"] == pytest.approx(t["loss"], rel=1e-4) and o["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-3)


# ----------------------------------------------------------------------------------- tokenizer, tags, dtype, metrics
@pytest.mark.parametrize("source", ["jinja", "folder"])
def test_chat_template_path(tmp_path, sc_path, source):
    donor = ptok()
    donor.chat_template = "{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + '<|im_end|>' }}{% endfor %}"
    donor.save_pretrained(tmp_path / "donor")
    path = tmp_path / "donor" if source == "folder" else tmp_path / "template.jinja"
    if source == "jinja":
        path.write_text(donor.chat_template)
    toks = [ptok() for _ in TRAINERS]
    trainers = [make(w, tmp_path, lambda: seq_cls(sc_path), data(), tok=tk, chat_template_path=str(path))
                for w, tk in zip(TRAINERS, toks)]
    assert toks[0].chat_template == toks[1].chat_template == donor.chat_template and len(toks[0]) == len(toks[1])
    assert ids(trainers[0], "chosen_ids") == ids(trainers[1], "chosen_ids")
    sizes = [tr.model.get_input_embeddings().num_embeddings if w == "trl" else
             tr.model.model.get_input_embeddings().num_embeddings for w, tr in zip(TRAINERS, trainers)]
    assert sizes[0] == sizes[1] and (sizes[0] % 64 == 0) == (source == "folder")  # cloned: resized to a multiple of 64
    trains(trainers)


def test_tags(tmp_path, sc_path):
    trainers = pair(tmp_path, lambda: seq_cls(sc_path), data())
    for tr in trainers:
        assert {"trl", "reward-trainer"} <= set(tr.model.model_tags)
    trainers[1].save_model(str(tmp_path / "card"))
    front = (tmp_path / "card" / "README.md").read_text().split("---")[1]
    assert "trl" in front and "reward-trainer" in front


def test_dtype(tmp_path, sc_path, monkeypatch):
    """model_init_kwargs dtype: the model loads in it in both. Intentional: our score heads stay fp32. Ours loads
    the model itself, so TRL must not be told a loaded model came with model_init_kwargs ("will be ignored")."""
    import trl.trainer.reward_trainer as trl_rt

    warned = []
    monkeypatch.setattr(trl_rt.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    ours = make(TRAINERS[1], tmp_path, sc_path, data(), model_init_kwargs={"dtype": torch.bfloat16})
    assert not [w for w in warned if "model_init_kwargs" in w], warned
    assert ours.args.model_init_kwargs == {"dtype": torch.bfloat16}  # the user's config is left as given
    trl_tr, ours = pair(tmp_path, sc_path, data(), model_init_kwargs={"dtype": torch.bfloat16})
    assert {p.dtype for p in trl_tr.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ours.model.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ours.model.heads.parameters()} == {torch.float32}
    trains([trl_tr, ours])


def test_compute_metrics(tmp_path, sc_path):
    seen = {}

    def metric(which):
        def compute(pred):
            seen[which] = pred.predictions
            return {"my_metric": 0.123}
        return compute

    trainers = [make(w, tmp_path, lambda: seq_cls(sc_path), data(), eval_dataset=data(8, 1),
                     compute_metrics=metric(w)) for w in TRAINERS]
    t, o = (tr.evaluate() for tr in trainers)
    assert t["eval_my_metric"] == o["eval_my_metric"] == 0.123 and set(t) <= set(o)
    assert seen["trl"].shape == seen["ours"].shape == (16, 1)  # [chosen; rejected] rewards per batch
    assert torch.allclose(torch.as_tensor(seen["trl"]), torch.as_tensor(seen["ours"]), atol=1e-5)


# --------------------------------------------------------------------------------------- intentional differences
def test_intentional_differences_in_defaults():
    trl_cfg, ours = RewardConfig("x", use_cpu=True), RewardEnsembleConfig("x", use_cpu=True)
    assert trl_cfg.gradient_checkpointing and not ours.gradient_checkpointing  # ours: off (small LoRA trunks)
    assert trl_cfg.bf16 and not ours.bf16  # ours: on only where CUDA supports bf16 (TRL: bf16 autocast on a CPU too)
    assert ours.learning_rate == trl_cfg.learning_rate == 1e-4  # the same
    assert ours.ensemble_size == 1 and ours.max_length == trl_cfg.max_length


def test_intentional_difference_pooling_when_pad_is_eos(tmp_path, sc_path):
    """With pad == EOS, transformers' seq-cls model (TRL) scores the token before the final EOS (the last non-pad
    token); ours scores the last attended token, the EOS itself. (A checkpoint whose config has pad == EOS, i.e. a
    head trained at the token before, gets a warning: tests/test_reward_trainer.py.)"""
    tok = tiny_tokenizer()  # pad == eos
    model = seq_cls(sc_path)
    trl_tr = make("trl", tmp_path, lambda: seq_cls(sc_path), data(), tok=tok)
    ours = make("ours", tmp_path, lambda: seq_cls(sc_path), data(), tok=tiny_tokenizer())
    seq = torch.tensor([trl_tr.train_dataset[0]["chosen_ids"]])
    assert seq[0, -1] == tok.eos_token_id
    with torch.no_grad():
        hidden = model.model(input_ids=seq).last_hidden_state[0]
        trl_r = trl_tr.model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, 0]
        our_r = ours.model(seq, torch.ones_like(seq))[0, 0]
    assert trl_r == pytest.approx(model.score(hidden[-2]).item(), abs=1e-5)
    assert our_r == pytest.approx(model.score(hidden[-1]).item(), abs=1e-5)
