"""A plugin written by a user, as the README's Plugins section describes it: what the trainers check of its output
and its state, so that a mistake in it ends in an error naming it — not a broadcast, an in-place edit of θ_old's
log-probs, a β that pays for KL, a NaN that skips every step, or a state lost on resume."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

import rlhf_ext.registry as reg
from rlhf_ext.plugins.aggregation import Aggregator
from rlhf_ext.plugins.kl import KLController
from rlhf_ext.plugins.shaping import Shaper, as_reward_func
from rlhf_ext.registry import available, build, register
from rlhf_ext.reward.pipeline import RewardPipeline

from .test_ppo import make


class InPlaceK1:
    def __call__(self, logp, ref_logp):
        return logp.sub_(ref_logp)  # k1, written into its input


class PerSequence:
    def __call__(self, logp, ref_logp):
        return (logp - ref_logp).sum(-1)  # [B], not [B, T]


class Signed(KLController):
    state_keys = ("beta",)

    def update(self, kl, n_steps=1):
        self.beta = -0.5  # a sign error: a penalty turned into a bonus
        return self.beta


class NaNForLong(Shaper):
    """NaN for the answers longer than `limit` tokens (a length ratio dividing by zero, say)."""

    def __init__(self, limit: int = 3):
        self.limit = limit

    def __call__(self, scores, info):
        return torch.where(info.lengths > self.limit, torch.full_like(scores, math.nan), scores)


class NaNForFirst(Shaper):
    def __call__(self, scores, info):
        out = scores.clone()
        out[0] = math.nan
        return out


class FirstTokens(Shaper):
    """A shaper with a state that starts empty: how often each first token was seen."""

    def __init__(self):
        self.counts = {}

    def __call__(self, scores, info):
        for ids in info.ids:
            if len(ids):
                self.counts[str(int(ids[0]))] = self.counts.get(str(int(ids[0])), 0) + 1
        return scores

    def state_dict(self):
        return dict(self.counts)  # {} until the first batch

    def load_state_dict(self, state):
        self.counts = dict(state)


@pytest.fixture(autouse=True, scope="module")
def _these_plugins():
    """This file's plugins, registered while it runs and gone after it (other files list every registered name)."""
    register("kl_estimator", "contract_inplace_k1")(InPlaceK1)
    register("kl_estimator", "contract_per_sequence")(PerSequence)
    register("kl_controller", "contract_signed")(Signed)
    register("shaper", "contract_nan_long")(NaNForLong)
    register("shaper", "contract_nan_first")(NaNForFirst)
    register("shaper", "contract_first_tokens")(FirstTokens)
    yield
    for names in reg._REGISTRY.values():
        for name in [n for n in names if n.startswith("contract_")]:
            del names[name]


def _lora(tr):
    return {n: p.detach().clone() for n, p in tr.policy.peft.named_parameters() if p.requires_grad and "lora_" in n}


def test_an_estimator_gets_copies_and_must_return_one_value_per_token(tmp_path, tok):
    """k1 written in place into its input changed θ_old's log-probs, which the PPO ratio reads next (the same
    run trained to other weights); a per-sequence [B] output broadcast against [B, T] when B equalled T."""
    runs = {}
    for name in ("k1", "contract_inplace_k1"):
        tr = make(tmp_path / name, tok, max_steps=2, per_device_train_batch_size=8, kl_estimator=name)
        hist = tr.train()
        runs[name] = (_lora(tr), [h["objective/kl"] for h in hist])
    (ref, ref_kl), (ours, our_kl) = runs["k1"], runs["contract_inplace_k1"]
    assert ref.keys() == ours.keys() and all(torch.equal(ref[n], ours[n]) for n in ref)
    assert our_kl == ref_kl
    tr = make(tmp_path / "seq", tok, max_steps=1, per_device_train_batch_size=8, max_completion_length=8,
              kl_estimator="contract_per_sequence")
    with pytest.raises(ValueError, match=r"kl_estimator plugin 'contract_per_sequence' returned .*shape \(8,\).*"
                                         r"shape \(8, \d+\)"):
        tr.train()


def test_a_controller_that_sets_a_negative_beta_is_stopped_by_name(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=2, per_device_train_batch_size=8, kl_controller="contract_signed",
              kl_target=1.0)
    with pytest.raises(ValueError, match=r"kl_controller 'contract_signed' set β = -0.5.*Clamp it"):
        tr.train()
    from rlhf_ext import KLControllerCallback

    cb = KLControllerCallback(build("kl_controller", "contract_signed", init_beta=0.1), SimpleNamespace(beta=0.1))
    with pytest.raises(ValueError, match="contract_signed"):
        cb.on_log(None, SimpleNamespace(log_history=[]), None, logs={"kl": 0.3})


def _lengths_batch():
    ids = [[5] * n for n in (1, 2, 3, 4, 5, 6)]  # content lengths 1…6, no EOS
    return ["p"] * 6, ["x"] * 6, ids


def _const(prompts, completions, completion_ids, **kw):
    return [1.0] * len(completion_ids)


def test_a_shaper_nan_drops_its_samples_and_names_the_shaper():
    """One NaN from a shaper used to reach the loss: every optimizer step of the batch was NaN (and skipped), and
    `rewards/dropped_nonfinite` read 0."""
    prompts, completions, ids = _lengths_batch()
    p = RewardPipeline([_const], shapers=[{"name": "contract_nan_long", "limit": 3}], nonfinite="drop")
    with pytest.warns(UserWarning, match=r"shaper 'contract_nan_long' returned non-finite scores for 3 of 6"):
        scores, valid, _, _ = p.score(prompts, completions, ids)
    assert valid.tolist() == [len(i) <= 3 for i in ids] and torch.isfinite(scores).all()
    assert p.dropped_total == 3
    assert p(prompts=prompts, completions=completions, completion_ids=ids)[3:] == [None] * 3
    strict = RewardPipeline([_const], shapers=[{"name": "contract_nan_long", "limit": 3}], nonfinite="error")
    with pytest.raises(ValueError, match=r"shaper 'contract_nan_long' returned non-finite.*3 of 6"):
        strict.score(prompts, completions, ids)


def test_a_shaper_nan_in_ppo_leaves_the_other_samples_to_train_on(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=2, per_device_train_batch_size=8, shapers=["contract_nan_first"])
    with pytest.warns(UserWarning, match="shaper 'contract_nan_first' returned non-finite scores for 1 of 8"):
        hist = tr.train()
    for h in hist:  # the first sample of each batch dropped and counted, the other 7 trained on with a finite loss
        assert h["rewards/dropped_nonfinite"] == 1 and h["optim/skipped_nonfinite_steps"] == 0
        assert math.isfinite(h["loss/policy"]) and math.isfinite(h["objective/scores"])


class _List(Aggregator):
    def __call__(self, r):
        return r.mean(-1).tolist()


class _NoReduce(Aggregator):
    def __call__(self, r):
        return r


@pytest.mark.parametrize("cls, got", [(_List, "a list"), (_NoReduce, r"a torch.float32 tensor of shape \(6, 2\)")])
def test_an_aggregation_output_of_the_wrong_kind_is_refused_by_name(cls, got):
    name = f"contract_{cls.__name__.lower()}"
    if name not in available("aggregation"):
        register("aggregation", name)(cls)
    prompts, completions, ids = _lengths_batch()
    p = RewardPipeline([_const, _const], aggregation=name)
    with pytest.raises(ValueError, match=rf"aggregation plugin '{name}' returned {got}; .*shape \(6,\)"):
        p.score(prompts, completions, ids)


def test_a_shaper_output_of_the_wrong_shape_is_refused_as_a_trl_reward_function():
    class Total(Shaper):
        name = "contract_total"

        def __call__(self, scores, info):
            return -info.lengths.float().sum()  # one number for the batch

    f = as_reward_func(Total())
    with pytest.raises(ValueError, match=r"shaper plugin 'contract_total' returned .*shape \(\).*shape \(2,\)"):
        f(prompts=["p", "p"], completions=["a", "b"], completion_ids=[[1], [1, 2]])


def test_a_shaper_whose_state_starts_empty_is_restored():
    """The pipeline kept a shaper's state only when it was non-empty at save time: a dict that starts {} was saved
    later but then not restored ("not in this pipeline")."""
    prompts, completions, ids = _lengths_batch()
    first = RewardPipeline([_const], shapers=["contract_first_tokens"])
    empty = first.state_dict()
    assert empty["shapers"] == {"contract_first_tokens": {}}
    first.score(prompts, completions, ids)
    saved = json.loads(json.dumps(first.state_dict()))  # through a checkpoint's JSON
    again = RewardPipeline([_const], shapers=["contract_first_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(saved)
    assert again.shapers[0].counts == {"5": 6}


def test_a_state_a_checkpoint_cannot_hold_is_refused_when_the_plugin_is_built():
    from collections import deque

    @register("kl_controller", "contract_windowed")
    class Windowed(KLController):
        state_keys = ("beta", "window")

        def __init__(self, init_beta=0.05, target=None):
            super().__init__(init_beta, target)
            self.window = deque(maxlen=4)

    with pytest.raises(ValueError, match=r"kl_controller plugin 'contract_windowed' has a state_dict\(\) a checkpoint "
                                         r"cannot hold .*deque.*JSON"):
        build("kl_controller", "contract_windowed")


def test_an_undeclared_controller_state_says_what_came_back_from_the_checkpoint():
    class Stepper(KLController):
        name = "contract_stepper"

        def __init__(self, init_beta=0.05, target=None, factor=1.0):
            super().__init__(init_beta, target)
            self.factor = factor

    saved = Stepper(0.1, factor=2.0).state_dict()
    resumed = Stepper(0.1, factor=1.0)
    with pytest.warns(UserWarning, match=r"declares no state_keys.*factor=2.0 \(configured 1.0\).*state_keys"):
        resumed.load_state_dict(saved)

    class Declared(Stepper):
        state_keys = ("beta",)

    kept = Declared(0.1, factor=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept.load_state_dict({**saved, "beta": 0.3})
    assert kept.factor == 1.0 and kept.beta == 0.3


def test_two_detectors_of_one_name_keep_their_own_metric_and_state(tmp_path, tok):
    """Two `repetition` detectors (n=2 and n=4) shared one monitor/<name> metric, one alarm and one checkpoint slot:
    after a resume both held the second's state."""
    detectors = [{"name": "repetition", "n": 2, "smoothing": 0.0}, {"name": "repetition", "n": 4, "smoothing": 0.0}]
    tr = make(tmp_path, tok, max_steps=2, per_device_train_batch_size=8, monitor_detectors=detectors)
    last = tr.train()[-1]
    from rlhf_ext.plugins.shaping import content_ids, repeated_ngram_fraction

    ro = tr.rollout  # the statistic on the last batch (excess over the reference policy's), computed here
    body = content_ids(ro.completion_ids, ro.lengths)
    for key, n in (("monitor/repetition", 2), ("monitor/repetition#2", 4)):
        expect = sum(repeated_ngram_fraction(b, n) for b in body) / len(body) - tr.monitor.reference[f"repetition_{n}"]
        assert last[key] == pytest.approx(expect), key
    state = tr.monitor.state_dict()["detectors"]
    assert set(state) == {"repetition", "repetition#2"}
    fresh = make(tmp_path / "again", tok, max_steps=2, per_device_train_batch_size=8, monitor_detectors=detectors)
    fresh.monitor.trainer.iteration = 2
    fresh.monitor.load_state_dict(tr.monitor.state_dict())
    assert [d.value for d in fresh.monitor.detectors] == [d.value for d in tr.monitor.detectors]


class _EntryPoint:
    def __init__(self, name, value, load):
        self.name, self.value, self._load = name, value, load
        self.dist = SimpleNamespace(name="userplug", version="0.1")

    def load(self):
        return self._load()


def test_installed_plugins_are_listed_without_import_and_a_broken_one_is_named(monkeypatch):
    imported = []

    def broken():
        imported.append("robust")
        raise ModuleNotFoundError("No module named 'scipy_xyz'")

    eps = [_EntryPoint("aggregation.contract_robust", "userplug.robust:Robust", broken),
           _EntryPoint("aggregation.mean", "userplug.agg:MyMean", lambda: imported.append("mean"))]
    monkeypatch.setattr(reg, "entry_points", lambda group: eps if group == reg.ENTRY_POINT_GROUP else [])
    assert "contract_robust" in available("aggregation") and imported == []
    with pytest.raises(ValueError, match=r"Valid names: .*contract_robust"):
        reg.get("aggregation", "contract_robus")
    with pytest.raises(ValueError, match=r"aggregation plugin 'contract_robust' \(package userplug 0.1\) could not be "
                                         r"imported: .*userplug.robust:Robust.*ModuleNotFoundError.*scipy_xyz"):
        reg.get("aggregation", "contract_robust")
    monkeypatch.setattr(reg, "_SHADOWED", set())
    with pytest.warns(UserWarning, match=r"declares the aggregation plugin 'mean' .*userplug.agg:MyMean.*not loaded"):
        assert reg.get("aggregation", "mean").__module__ == "rlhf_ext.plugins.aggregation"
    assert imported == ["robust"]


def test_a_controller_that_does_not_subclass_the_base_is_refused_with_the_fix():
    @register("kl_controller", "contract_duck")
    class Duck:
        beta = 0.1

        def update(self, kl, n_steps=1):
            return self.beta

    with pytest.raises(ValueError, match=r"kl_controller plugin 'contract_duck' .*does not subclass "
                                         r"rlhf_ext.plugins.kl.KLController.*subclass it"):
        build("kl_controller", "contract_duck")


def test_a_whole_global_batch_dropped_by_a_shaper_names_the_shaper(tmp_path, tok):
    """Under DDP the trainer decides on the global batch, and its error blamed "the reward function" when a shaper
    had made every sample NaN (one process named the shaper). (A batch of 16: a smaller one dropped whole trains on
    nothing, and the run stops after 16 samples dropped in a row.)"""
    tr = make(tmp_path, tok, max_steps=1, per_device_train_batch_size=16,
              shapers=[{"name": "contract_nan_long", "limit": -1}])
    tr.rewards.batch_is_a_share = True  # as under DDP: the pipeline leaves the whole-batch check to the trainer
    with pytest.warns(UserWarning), pytest.raises(
            ValueError, match=r"global batch .*\(The shaper 'contract_nan_long' returned non-finite scores\).*Fix the shaper"):
        tr.train()
