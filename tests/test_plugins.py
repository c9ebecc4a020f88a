import math

import pytest
import torch

import rlhf_ext  # noqa: F401  (registers built-ins)
from rlhf_ext.reward.pipeline import RewardPipeline
from rlhf_ext.plugins.kl import build_controller
from rlhf_ext.registry import available, build, get, register
from rlhf_ext.plugins.shaping import ResponseInfo, as_reward_func, repeated_ngram_fraction


def test_unknown_plugin_lists_valid_names():
    with pytest.raises(ValueError, match="Valid names: .*adaptive.*fixed.*hard.*lagrangian"):
        get("kl_controller", "nope")
    with pytest.raises(ValueError, match="Unknown plugin point"):
        get("nope", "mean")


def test_register_custom_plugin_and_builtins_present():
    @register("aggregation", "test_max")
    class Max:
        def __call__(self, r):
            return r.max(-1).values

    assert "test_max" in available("aggregation")
    assert build("aggregation", "test_max")(torch.tensor([[1.0, 3.0]])).item() == 3.0
    assert {"mean", "min", "uwo", "median", "weighted"} <= set(available("aggregation"))
    assert {"linear", "target", "overlong", "debias", "missing_eos", "repetition", "batch_novelty"} <= set(available("shaper"))


def test_aggregations():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    assert build("aggregation", "mean")(r).item() == 3.0
    assert build("aggregation", "min")(r).item() == 1.0
    assert build("aggregation", "median")(r).item() == 2.0
    assert build("aggregation", "uwo", lam=0.5)(r).item() == pytest.approx(3.0 - 0.5 * r.var(unbiased=False).item())
    assert build("aggregation", "weighted", weights=[1, 0, 1])(r).item() == 3.5


def info(lengths, eos=None, ids=None):
    L = torch.tensor(lengths, dtype=torch.float)
    return ResponseInfo(L, torch.tensor(eos if eos is not None else [True] * len(lengths)), ids or [[1] * n for n in lengths])


def test_length_shapers():
    s = torch.zeros(3)
    assert build("shaper", "linear", alpha=0.1, free_tokens=10)(s, info([5, 10, 20])).tolist() == pytest.approx([0, 0, -1.0])
    assert build("shaper", "target", alpha=0.1, target_length=10)(s, info([5, 10, 20])).tolist() == pytest.approx([-0.5, 0, -1.0])
    out = build("shaper", "overlong", max_length=20, cache_length=10)(torch.zeros(4), info([5, 15, 20, 25]))
    assert out.tolist() == pytest.approx([0.0, -0.5, -1.0, -1.0])
    assert build("shaper", "missing_eos", penalty=2.0)(torch.zeros(2), info([3, 3], eos=[True, False])).tolist() == [0, -2]


@pytest.mark.parametrize("name,kwargs", [("linear", {"alpha": -0.05}), ("linear", {"free_tokens": -1}),
                                         ("target", {"alpha": -0.1}), ("overlong", {"coef": -1.0}),
                                         ("missing_eos", {"penalty": -1.0}), ("repetition", {"alpha": -1.0}),
                                         ("batch_novelty", {"alpha": -0.5})])
def test_a_negative_charge_is_refused_with_the_fix(name, kwargs):
    """A negative charge would pay the policy for what the shaper charges (long, unended, repeated answers)."""
    with pytest.raises(ValueError, match=rf"{next(iter(kwargs))}=-.*≥ 0"):
        build("shaper", name, **kwargs)
    build("shaper", name, **{k: 0 for k in kwargs})  # 0 switches it off, and is accepted


def test_debias_removes_length_slope():
    L = torch.arange(1.0, 11.0)
    scores = 0.5 * L + 1.0
    out = build("shaper", "debias", momentum=0.0)(scores, info(L.int().tolist()))
    assert torch.allclose(out, torch.full_like(out, out.mean()), atol=1e-5)


def test_debias_slope_leaves_out_samples_whose_reward_was_dropped():
    """A dropped sample reaches the shapers with score 0: in debias's regression it made a length-independent reward
    look length-dependent (the two longest dropped: slope −0.11, so the kept answers were paid +0.11 per token)."""
    from rlhf_ext.reward.pipeline import RewardPipeline

    ids = [[5] * n + [0] for n in (2, 4, 6, 8, 10, 12)]
    pipe = RewardPipeline([lambda prompts, completions, completion_ids, **kw: [1.0] * 4 + [None] * 2],
                          shapers=[{"name": "debias", "momentum": 0.0}], eos_token_id=0, callable_normalization="none")
    with pytest.warns(UserWarning, match="non-finite"):
        scores, valid, _, _ = pipe.score([""] * 6, [""] * 6, ids)
    assert valid.tolist() == [True] * 4 + [False] * 2
    assert pipe.shapers[0].slope == 0.0 and torch.equal(scores[valid], torch.ones(4))


def test_repetition_penalty_catches_loops():
    loop = [1, 2, 3, 4] * 6
    assert repeated_ngram_fraction(loop, 3) > 0.8 and repeated_ngram_fraction(list(range(20)), 3) == 0.0
    out = build("shaper", "repetition", alpha=1.0)(torch.zeros(2), info([24, 20], ids=[loop, list(range(20))]))
    assert out[0] < -0.8 and out[1] == 0.0


@pytest.mark.parametrize("seed", range(20))
def test_batch_novelty_charges_the_wording_other_answers_share(seed):
    """Against a pairwise count: each response's share of distinct n-grams found in some other response's content."""
    g = torch.Generator().manual_seed(seed)
    B, n, alpha, eos = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g)), 0.7, 99
    ids = [torch.randint(0, 5, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(B)]
    ids = [x + [eos] if i % 2 else x for i, x in enumerate(ids)]  # every other answer ended: its EOS is not content
    out = build("shaper", "batch_novelty", alpha=alpha, n=n)(torch.ones(B), ResponseInfo.from_ids(ids, eos))

    content = [x[:-1] if x and x[-1] == eos else x for x in ids]
    for i, x in enumerate(content):
        own = {tuple(x[k : k + n]) for k in range(len(x) - n + 1)}
        others = [{tuple(y[k : k + n]) for k in range(len(y) - n + 1)} for j, y in enumerate(content) if j != i]
        shared = sum(any(t in o for o in others) for t in own) / len(own) if own else 0.0
        assert out[i].item() == pytest.approx(1.0 - alpha * shared)


def test_batch_novelty_cases_and_reward_func():
    stock = [7, 8, 9]  # the same opening in every answer
    fresh = [[*stock, 1, 2], [*stock, 3, 4], [5, 6, 10, 11, 12]]
    out = build("shaper", "batch_novelty", alpha=1.0, n=2)(torch.zeros(3), info([5, 5, 5], ids=fresh))
    assert out.tolist() == pytest.approx([-0.5, -0.5, 0.0])  # 2 of 4 bigrams shared; the third answer shares none
    alone = build("shaper", "batch_novelty")(torch.zeros(1), info([5], ids=[[1, 1, 1, 1, 1]]))
    assert alone.item() == 0.0  # repetition within one answer is the `repetition` shaper's business
    func = as_reward_func(build("shaper", "batch_novelty", alpha=1.0, n=2))
    assert func(completion_ids=fresh) == pytest.approx([-0.5, -0.5, 0.0])
    with pytest.raises(ValueError, match="n ≥ 1"):
        build("shaper", "batch_novelty", n=0)


def test_controllers():
    lag = build_controller("lagrangian", 0.1, 2.0, lr=0.05)
    b0 = lag.beta
    assert lag.update(5.0) > b0  # KL above δ → β up
    b1 = lag.beta
    assert lag.update(0.5) < b1  # below → β down
    ad = build_controller("adaptive", 0.1, 2.0, horizon=100)
    assert ad.update(4.0, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    fixed = build_controller("fixed", 0.1, None)
    assert fixed.update(100.0) == 0.1
    with pytest.raises(ValueError, match="must be > 0"):
        build_controller("hard", 0.1, 0.0)
    with pytest.raises(ValueError, match="must be > 0"):
        build_controller("hard", 0.1, -1.0)
    state = lag.state_dict()
    lag2 = build_controller("lagrangian", 0.1, 2.0, lr=0.05)
    lag2.load_state_dict(state)
    assert lag2.beta == lag.beta and lag2.integral == lag.integral


def test_pipeline_nonfinite_drop_and_error():
    def bad(prompts, completions, completion_ids, **kw):
        return [1.0, math.nan, 2.0]

    p = RewardPipeline([bad], nonfinite="drop")
    scores, valid, _, _ = p.score(["a"] * 3, ["x"] * 3, [[1], [1], [1]])
    assert valid.tolist() == [True, False, True] and torch.isfinite(scores).all()
    assert p(prompts=["a"] * 3, completions=["x"] * 3, completion_ids=[[1]] * 3)[1] is None
    with pytest.raises(ValueError, match=r"bad.*non-finite.*nonfinite_rewards"):
        RewardPipeline([bad], nonfinite="error").score(["a"] * 3, ["x"] * 3, [[1], [1], [1]])


def test_shaper_as_trl_reward_func():
    f = as_reward_func(build("shaper", "linear", alpha=0.5, free_tokens=1))
    assert f(prompts=["p", "p"], completions=["a", "b"], completion_ids=[[1], [1, 2, 3]]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="RewardPipeline"):
        as_reward_func(build("shaper", "debias"))


def test_entry_point_plugins_load_only_when_named(monkeypatch):
    import rlhf_ext.registry as reg

    loaded = []

    class EP:
        name = "aggregation.from_ep"

        def load(self):
            loaded.append(1)

            class FromEP:
                def __call__(self, r):
                    return r.sum(-1)

            return FromEP

    monkeypatch.setattr(reg, "entry_points", lambda group: [EP()] if group == reg.ENTRY_POINT_GROUP else [])
    with pytest.raises(ValueError):
        get("aggregation", "other_name")
    assert loaded == []
    assert build("aggregation", "from_ep")(torch.tensor([[1.0, 2.0]])).item() == 3.0 and loaded == [1]


def test_repetition_counts_content_not_the_final_eos():
    """Shaper lengths count content tokens; so does the repetition penalty and its detector: "a b a b" is charged
    alike ended or cut off (the extra n-gram holding the EOS used to dilute the ended answer's fraction)."""
    eos, body = 99, [1, 2, 1, 2]
    both = ResponseInfo.from_ids([body + [eos], body], eos)
    out = build("shaper", "repetition", alpha=1.0, n=2)(torch.zeros(2), both)
    assert out.tolist() == pytest.approx([-1 / 3, -1 / 3])  # 2-grams (1,2) (2,1) (1,2): one of three repeats
    from rlhf_ext.plugins.detectors import Observation

    det = build("detector", "repetition", n=2, smoothing=0.0)
    obs = Observation(0, both.lengths, both.has_eos, ["", ""], both.ids, torch.zeros(2), torch.zeros(2, 1),
                      torch.ones(2, dtype=torch.bool), {}, {})
    assert det.update(obs)[0] == pytest.approx(1 / 3)


def test_kl_controller_callback_ignores_a_nan_kl():
    """A NaN KL fed to a controller leaves β (and the Lagrangian's integral) NaN for the rest of the run."""
    from types import SimpleNamespace

    from rlhf_ext import KLControllerCallback

    trainer = SimpleNamespace(beta=0.1)
    cb = KLControllerCallback(build_controller("lagrangian", 0.1, 0.05, lr=1.0), trainer)
    for kl in (0.0, float("nan"), 0.0):
        cb.on_log(None, SimpleNamespace(log_history=[]), None, logs={"kl": kl})
    replay = build_controller("lagrangian", 0.1, 0.05, lr=1.0)
    replay.update(0.0), replay.update(0.0)
    assert trainer.beta == pytest.approx(max(replay.beta, 1e-6)) and math.isfinite(cb.controller.integral)
