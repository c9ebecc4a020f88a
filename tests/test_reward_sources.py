"""Reward sources a user brings to PPOTrainer together: two rlhf_ext reward models on the policy's base each keep
their own adapter, weights are checked against the member columns, audit judges may be reward models and may leave
samples ungraded, and a reward model that cannot render conversational prompts is refused at construction."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaForSequenceClassification

from rlhf_ext import (ExternalRewardModel, PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer,
                      load_reward_model)
from rlhf_ext.registry import build
from rlhf_ext.models import load_model
from rlhf_ext.testing import tiny_causal_lm, tiny_config, tiny_tokenizer

from .conftest import preference_rows
from .test_ppo import good_counter, make, prompts


def _artifact(tmp_path, tiny_path, tok, name: str, seed: int) -> str:
    out = str(tmp_path / name)
    args = RewardEnsembleConfig(out, max_steps=3, per_device_train_batch_size=8, report_to="none", save_strategy="no",
                                use_cpu=True, disable_tqdm=True, normalization_samples=16, seed=seed,
                                learning_rate=5e-2)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(32, seed)),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tr.train()
    tr.save_model(out)
    return out


def test_two_reward_models_on_the_policys_base_keep_their_own_adapters(tmp_path, tiny_path, tok):
    """Both artifacts name their adapter "reward" and their member "member_0": the second used to overwrite the
    first's adapter weights on the shared base (member A then scored with B's adapter, silently) and their metrics
    were one key."""
    a, b = _artifact(tmp_path, tiny_path, tok, "rm_a", 0), _artifact(tmp_path, tiny_path, tok, "rm_b", 1)
    tr = make(tmp_path, tok, reward=[a, b], model=load_model(tiny_path, "causal"), max_steps=1)
    tr.model_name = tiny_path
    assert {"rm_reward", "rm2_reward"} <= set(tr.policy.peft.peft_config)
    rows = preference_rows(4, 9)
    P, C = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    for member, path in zip(tr.rewards.members, (a, b)):  # each hosted member scores as its artifact alone
        alone = load_reward_model(path)
        assert torch.allclose(member.score_texts(P, C), alone.score_texts(P, C), atol=1e-5)
    hist = tr.train()
    assert tr.rewards.member_names == ["member_0", "member_0#2"]
    assert {"rewards/member_0_raw", "rewards/member_0#2_raw"} <= set(hist[0])


def test_weights_are_one_per_member_column_and_may_be_negative(tmp_path, tok):
    def first(completions, **kw):
        return [1.0] * len(completions)

    def second(completions, **kw):
        return [2.0] * len(completions)

    with pytest.raises(ValueError, match=r"2 given for 3 member columns \(first, second, positive_words\)"):
        make(tmp_path, tok, reward=[first, second, good_counter(tok)], aggregation="weighted",
             aggregation_kwargs={"weights": [1.0, 1.0]})
    r = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    w = [2.0, -1.0, 0.5]
    expected = [sum(wi * ri for wi, ri in zip(w, row)) / sum(abs(x) for x in w) for row in r.tolist()]
    assert build("aggregation", "weighted", weights=w)(r).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="not all zero"):
        build("aggregation", "weighted", weights=[0.0, 0.0])


def _classifier_folder(tmp_path, with_template: bool) -> str:
    tok = tiny_tokenizer()
    if not with_template:
        tok.chat_template = None
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))
    out = tmp_path / ("cls_template" if with_template else "cls_plain")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_a_reward_model_that_cannot_render_conversational_prompts_is_refused_at_construction(tmp_path, tok):
    """It failed at the first rollout with transformers' generic chat-template error, naming neither the reward nor
    the way out."""
    plain = _classifier_folder(tmp_path, with_template=False)
    with pytest.raises(ValueError, match=r"Reward model 'cls_plain': the prompts are conversational.*"
                                         r"reward_processing_classes"):
        make(tmp_path, tok, reward=[plain], data=prompts(8, conversational=True), per_device_train_batch_size=8)
    make(tmp_path / "text", tok, reward=[plain], data=prompts(8, conversational=False), max_steps=1,
         per_device_train_batch_size=8).train()


def test_audit_judges_may_be_reward_models_and_may_leave_samples_ungraded(tmp_path, tok):
    """An audit judge given as a classifier folder was called like a function (TypeError: 'str' object is not
    callable), a judge's None crashed the metrics; now the folder is loaded as a reward member and named after it,
    and `audit/<judge>` is the mean over the graded samples only."""
    folder = _classifier_folder(tmp_path, with_template=True)

    def half_graded(completions, **kw):
        return [None if i % 2 else float(len(c)) for i, c in enumerate(completions)]

    gold = ExternalRewardModel(LlamaForSequenceClassification(tiny_config(tok, num_labels=1)), tok, name="gold")
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=1, max_completion_length=8,
                     kl_controller="fixed", use_cpu=True, save_strategy="no", disable_tqdm=True, report_to="none")
    tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=good_counter(tok), args=args, train_dataset=prompts(8),
                    processing_class=tok, audit_funcs=[folder, half_graded, gold])
    assert list(tr.audit_funcs) == ["cls_template", "half_graded", "gold"]
    hist = tr.train()
    ro = tr.rollout
    graded = [float(len(c)) for i, c in enumerate(ro.completions) if i % 2 == 0]
    assert hist[0]["audit/half_graded"] == pytest.approx(sum(graded) / len(graded))
    # the classifier's own forward on what it was trained on, independently
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cls, cls_tok = AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    scores = []
    for p, c in zip(ro.prompts, ro.completions):
        text = cls_tok.apply_chat_template(p + c, tokenize=False)
        ids = cls_tok(text, add_special_tokens=False, return_tensors="pt")
        scores.append(float(cls(**ids).logits[0, 0]))
    assert hist[0]["audit/cls_template"] == pytest.approx(sum(scores) / len(scores), rel=1e-4)
    assert math.isfinite(hist[0]["audit/gold"])


def test_an_outside_classifier_is_normalised_like_a_callable_when_mixed(tmp_path, tok):
    """An outside classifier has no recorded scale: mixed with other members it was passed through raw (std 3.9
    beside members of std 1, so `min` picked it most of the time). Now a running mean/std, as for a callable — checked
    against the scores it returned — saved by name with the pipeline's state; a given mean/std is used as given."""
    folder = _classifier_folder(tmp_path, with_template=True)
    tr = make(tmp_path, tok, reward=[folder, good_counter(tok)], max_steps=2, per_device_train_batch_size=8)
    cls = tr.rewards.members[0]
    seen = []
    original = cls.score_completions

    def recording(*a, **k):
        r = original(*a, **k)
        seen.extend(r[:, 0].tolist())
        return r

    cls.score_completions = recording
    tr.train()
    assert cls.normalize == "running" and cls.count == len(seen) == 16
    assert float(cls.mean) == pytest.approx(sum(seen) / 16, rel=1e-6)
    assert float(cls.std) == pytest.approx(float(torch.tensor(seen, dtype=torch.float64).std()), rel=1e-5)
    assert "cls_template" in tr.rewards.state_dict()["members"]
    model = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))
    given = ExternalRewardModel(model, tok, name="given", mean=1.5, std=2.0)
    alone = ExternalRewardModel(model, tok, name="alone")
    from rlhf_ext import RewardPipeline

    RewardPipeline([given, alone, good_counter(tok)])
    assert (float(given.mean), float(given.std), given.normalize) == (1.5, 2.0, "none")
    assert alone.normalize == "running"


def test_a_classifier_with_several_outputs_as_a_reward_string_says_how_to_pick_one(tmp_path, tok):
    """transformers' size-mismatch RuntimeError named neither the reward nor the fix."""
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(tok, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                                        label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    model.save_pretrained(tmp_path / "sentiment")
    tok.save_pretrained(tmp_path / "sentiment")
    with pytest.raises(ValueError, match=r"2 outputs \(0: NEGATIVE, 1: POSITIVE\).*ExternalRewardModel\(model, "
                                         r"tokenizer, label="):
        make(tmp_path, tok, reward=[str(tmp_path / "sentiment")])


def test_a_reward_folder_without_its_tokenizer_is_refused_not_read_with_the_policys(tmp_path, tok):
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_config(tok, num_labels=1)).save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match=r"(?s)its tokenizer could not be loaded.*reward_processing_classes"):
        make(tmp_path, tok, reward=[str(tmp_path / "no_tokenizer")])
    built = LlamaForSequenceClassification(tiny_config(tok, num_labels=1))  # in code: the policy's, said
    with pytest.warns(UserWarning, match="scored with the policy's"):
        make(tmp_path / "built", tok, reward=[built])


def test_none_from_one_reward_function_means_not_applicable_as_in_trl():
    """TRL's reward_funcs contract: a function returns None where its reward does not apply (multi-task training: a
    math verifier on a coding prompt), and the sample is scored by the other functions; only a sample no function
    scored is left out. Here a None from any member dropped the sample, so two verifiers each None outside their own
    task dropped every sample ("Every sample of the batch got a non-finite reward … it returns NaN/inf/None for
    everything"). NaN / inf stay broken scores that drop the sample."""
    from rlhf_ext.reward.pipeline import RewardPipeline

    a_vals = [None, None, 1.0, 2.0, None, math.nan, 3.0]
    b_vals = [4.0, 5.0, None, None, None, 6.0, 7.0]

    def a(completions, **kw):
        return a_vals

    def b(completions, **kw):
        return b_vals

    ids = [[1]] * len(a_vals)
    p = RewardPipeline([a, b], "weighted", {"weights": [2.0, 1.0]}, callable_normalization="none")
    with pytest.warns(UserWarning, match=r"\['a', 'b'\] returned non-finite rewards for 2 of 7"):
        scores, valid, raw, _ = p.score(None, ["x"] * 7, ids)
    assert valid.tolist() == [True, True, True, True, False, False, True]
    # TRL's nansum(w · r) over the functions that scored, on the scale of a full row (÷ Σ|w| = 3): a weight means the
    # same on every sample
    trl = [sum(w * v for w, v in zip((2.0, 1.0), (x, y)) if v is not None) for x, y in zip(a_vals, b_vals)]
    assert scores.tolist() == pytest.approx([t / 3 for t in trl[:4]] + [0.0, 0.0, trl[6] / 3])
    zero = RewardPipeline([a, b], "weighted", {"weights": [0.0, 1.0]}, callable_normalization="none")
    with pytest.warns(UserWarning):
        assert zero.score(None, ["x"] * 7, ids)[0].tolist()[2:4] == [0.0, 0.0]  # TRL: nansum of 0 · r
    mean = RewardPipeline([a, b], "mean", callable_normalization="none")
    with pytest.warns(UserWarning):
        assert mean.score(None, ["x"] * 7, ids)[0].tolist() == pytest.approx([2.0, 2.5, 0.5, 1.0, 0.0, 0.0, 5.0])


def test_a_plugin_written_for_k_columns_is_not_handed_fewer():
    """An aggregation plugin that indexes its K columns (r[:, 1]) failed with a bare IndexError mid-run the first time
    a function returned None, and one keeping its weights in a list broadcast them over the one column left (a
    silently wrong score); without `missing_members = True` such samples are dropped, saying how to opt in."""
    from rlhf_ext.plugins.aggregation import Aggregator
    from rlhf_ext.reward.pipeline import RewardPipeline

    class Diff(Aggregator):
        name = "diff"

        def __call__(self, r):
            return r[:, 0] - 0.5 * r[:, 1]

    def a(completions, **kw):
        return [1.0, None, 3.0]

    def b(completions, **kw):
        return [1.0, 2.0, 2.0]

    p = RewardPipeline([a, b], Diff(), callable_normalization="none")
    with pytest.warns(UserWarning, match=r"'diff' takes every member's column \(set `missing_members = True`.*for 1 of 3"):
        scores, valid, _, _ = p.score(None, ["x"] * 3, [[1]] * 3)
    assert valid.tolist() == [True, False, True] and scores.tolist() == [0.5, 0.0, 2.0]

    class Last(Aggregator):  # opted in: handed the columns of the members that scored
        name, missing_members = "last", True

        def __call__(self, r):
            return r[:, -1]

    assert RewardPipeline([a, b], Last(), callable_normalization="none").score(None, ["x"] * 3, [[1]] * 3)[0].tolist() \
        == [1.0, 2.0, 2.0]


def test_multi_task_reward_functions_train_each_task_on_its_own_reward(tmp_path, tok):
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"write a short review of the {s} ."}]
                                         for s in "movie book song film food place day night".split() * 4],
                              "task": ["math", "code"] * 16})
    words = good_counter(tok)

    def math_reward(prompts, completions, completion_ids, task, **kw):
        return [r if t == "math" else None for r, t in zip(words(prompts, completions, completion_ids), task)]

    def code_reward(completions, completion_ids, task, **kw):
        return [float(len(ids)) if t == "code" else None for ids, t in zip(completion_ids, task)]

    hist = make(tmp_path, tok, reward=[math_reward, code_reward], data=data, max_steps=2,
                per_device_train_batch_size=8, monitor=True).train()
    assert all(h["rewards/dropped_nonfinite"] == 0 and math.isfinite(h["loss/policy"]) for h in hist)
    assert all(math.isfinite(h["rewards/math_reward_raw"]) and h["rewards/code_reward_raw"] >= 1 for h in hist)


def test_a_dropped_sample_names_the_member_with_the_broken_score_not_the_not_applicable_one():
    """A sample where `a` said None (not applicable) and `b` returned NaN is dropped for b's NaN: the warning named
    both; a sample every member left None names them all."""
    from rlhf_ext.reward.pipeline import RewardPipeline

    def a(completions, **kw):
        return [None, 1.0, None]

    def b(completions, **kw):
        return [math.nan, 2.0, 3.0]

    with pytest.warns(UserWarning, match=r"Reward member\(s\) \['b'\] returned non-finite rewards"):
        RewardPipeline([a, b], callable_normalization="none").score(None, ["x"] * 3, [[1]] * 3)

    def c(completions, **kw):
        return [None, 1.0, 2.0]

    with pytest.warns(UserWarning, match=r"Reward member\(s\) \['a', 'c'\] returned non-finite rewards"):
        RewardPipeline([a, c], callable_normalization="none").score(None, ["x"] * 3, [[1]] * 3)


def test_audit_model_paths_in_the_config_are_judges_and_repeated_names_keep_their_own_metric(tmp_path, tok):
    """The recipes could not pass an audit judge at all (audit_funcs is Python only), so proxy_vs_audit never had
    one to watch: `audit_model_paths` (a YAML list, or one path) adds reward models as judges. Two judges of one name
    (two lambdas; two folders called `cls_template`) were one dict key: the first was dropped without a word."""
    folder = _classifier_folder(tmp_path, with_template=True)
    twin = tmp_path / "other" / "cls_template"
    __import__("shutil").copytree(folder, twin)
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=1, max_completion_length=8,
                     kl_controller="fixed", use_cpu=True, save_strategy="no", disable_tqdm=True, report_to="none",
                     audit_model_paths=[folder, str(twin)])
    tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=good_counter(tok), args=args, train_dataset=prompts(8),
                    processing_class=tok, audit_funcs=[lambda completions, **kw: [1.0] * len(completions),
                                                       lambda completions, **kw: [2.0] * len(completions)])
    assert list(tr.audit_funcs) == ["cls_template", "cls_template#2", "<lambda>", "<lambda>#2"]
    hist = tr.train()
    assert (hist[0]["audit/<lambda>"], hist[0]["audit/<lambda>#2"]) == (1.0, 2.0)
    assert hist[0]["audit/cls_template"] == pytest.approx(hist[0]["audit/cls_template#2"], rel=1e-5)  # same weights
    assert PPOConfig(str(tmp_path / "one"), use_cpu=True, audit_model_paths=folder).audit_model_paths == [folder]
    with pytest.raises(ValueError, match=r"audit_model_paths takes reward-model paths or Hub ids .*PPOTrainer\(audit_funcs"):
        PPOConfig(str(tmp_path / "bad"), use_cpu=True, audit_model_paths=[len])
