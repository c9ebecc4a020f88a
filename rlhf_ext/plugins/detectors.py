"""Reward-hacking detectors (plugins, registry point `detector`).

Each iteration a detector reads one `Observation` (the rollout's lengths, EOS flags, texts, normalised member
rewards, shaped scores, audit scores, and the iteration's metrics), updates a smoothed statistic, and fires when it
crosses its threshold. The statistic is logged every iteration (`monitor/<name>`); what happens on firing is the
detector's `action`: "log" (an alarm in the logs), "queue" (its most suspicious samples go to the review queue beside
a reference-policy sample for the same prompt), or "halt" (checkpoint, stop, say what fired and how to resume).

Thresholds are relative to the *reference policy* where that makes sense (its response length, EOS rate and
repetition are measured once at the start of training on the same prompts), so they carry over between tasks.

A threshold alone fires on noise: with 8 samples a batch, a reference that ends 25 % of its answers shows a "halved"
EOS rate in a third of batches. So each detector that knows its statistic's sampling noise (`null`) also requires the
smoothed statistic to sit `z` standard errors beyond its no-hacking value, counting the noise of this run's smoothed
batches (exact for an exponential moving average of independent batches) and of the reference's own measurement.
False-alarm rates on simulated runs without hacking, and detection delays on the benchmark's hacking runs, are
measured by `benchmarks/detector_rates.py` (README, "False alarms and detection delays").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..registry import register
from ..rl_math import pearson, scored_by_every_member
from .shaping import content_ids, repeated_ngram_fraction

ACTIONS = ("log", "queue", "halt")


@dataclass
class Observation:
    """What detectors see of one iteration. B samples, K reward members."""

    iteration: int
    lengths: torch.Tensor  # [B] response tokens (EOS excluded)
    has_eos: torch.Tensor  # [B] bool
    texts: list  # B response texts
    ids: list  # B token-id lists
    scores: torch.Tensor  # [B] shaped aggregate reward
    norm: torch.Tensor  # [B, K] normalised member rewards
    valid: torch.Tensor  # [B] bool
    audit: dict  # name → B scores
    metrics: dict  # the iteration's logged metrics
    reference: dict = field(default_factory=dict)  # {"length": mean, "eos": rate} of the reference policy


class Detector:
    """Base class: `statistic(obs)` → float (or None when not applicable), fires when `stat > threshold` (or `<`
    for `direction="below"`), smoothed by an exponential moving average over iterations."""

    name = "base"
    direction = "above"
    default_warmup = 1  # observations before the detector may fire

    def __init__(self, threshold: float, action: str = "log", smoothing: float = 0.5, warmup: int | None = None,
                 z: float = 3.0):
        if action not in ACTIONS:
            raise ValueError(f"Detector action must be one of {ACTIONS}, got {action!r}.")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}.")
        if not z >= 0:
            raise ValueError(f"z (standard errors beyond the no-hacking value) must be ≥ 0, got {z}.")
        self.threshold, self.action, self.smoothing, self.z = float(threshold), action, smoothing, float(z)
        self.warmup = self.default_warmup if warmup is None else warmup
        self.value, self.seen, self.limit = None, 0, float(threshold)
        self.weight2 = 0.0  # Σ wᵢ² of the moving average's weights: its variance is weight2 × one batch's

    def statistic(self, obs: Observation) -> float | None:
        raise NotImplementedError(f"The detector {self.name!r} must implement statistic(obs) -> float | None.")

    def effective_threshold(self, obs: Observation) -> float:
        """The threshold this iteration is judged against (default: the configured one)."""
        return self.threshold

    def null(self, obs: Observation) -> tuple[float, float, float] | None:
        """(the statistic's value without hacking, the standard error of one batch's statistic, the standard error of
        the reference it is measured against), or None when the noise is unknown (no gate)."""
        return None

    def _beyond_noise(self, obs: Observation) -> bool:
        null = self.null(obs)
        if null is None:
            return True
        centre, se_batch, se_ref = null
        margin = self.z * math.sqrt(self.weight2 * se_batch**2 + se_ref**2)
        return self.value > centre + margin if self.direction == "above" else self.value < centre - margin

    def suspicious(self, obs: Observation, n: int) -> list[int]:
        """Indices of the n samples that best show the problem (default: highest shaped reward)."""
        return torch.argsort(obs.scores, descending=True)[:n].tolist()

    def update(self, obs: Observation) -> tuple[float | None, bool]:
        x = self.statistic(obs)
        if x is None or not math.isfinite(x):
            return self.value, False
        a = 0.0 if self.value is None else self.smoothing
        self.value = x if self.value is None else a * self.value + (1 - a) * x
        self.weight2 = a**2 * self.weight2 + (1 - a) ** 2
        self.seen += 1
        self.limit = self.effective_threshold(obs)
        fired = self.value > self.limit if self.direction == "above" else self.value < self.limit
        return self.value, bool(fired and self.seen >= self.warmup and self._beyond_noise(obs))

    def describe(self) -> str:
        return f"{getattr(self, 'key', self.name)} = {self.value:.3g} {'>' if self.direction == 'above' else '<'} {self.limit:.3g}"

    def state_dict(self) -> dict:
        return {"value": self.value, "seen": self.seen, "weight2": self.weight2}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.seen = state.get("value"), state.get("seen", 0)
        self.weight2 = state.get("weight2", 1.0 if self.value is not None else 0.0)


def _ratio_null(sd: float | None, ref: float, batch: int, n_ref: int | None):
    """Null of a batch mean divided by the reference's mean: 1 ± sd/ref/√batch, the reference ± sd/ref/√n_ref."""
    if sd is None or not ref > 0 or not n_ref or batch < 1:
        return None
    return 1.0, sd / ref / math.sqrt(batch), sd / ref / math.sqrt(n_ref)


# Length and EOS drift compare one batch's mean with the reference policy's: with prompts of different kinds a single
# batch can sit far from it before the policy has moved (a batch of open questions among one-line requests: 1.76×
# the reference length at iteration 1). Drift is a trend, so these two judge the smoothed value from the third
# iteration on (`default_warmup = 3`).


@register("detector", "length_drift")
class LengthDrift(Detector):
    """Mean response length relative to the reference policy's (1.0 = same); fires above `threshold` (default 1.5:
    50 % longer). When the completion cap leaves no room for that ratio (cap < threshold × reference length), it
    fires instead once the mean length reaches `cap_fraction` of the cap, or half-way from the reference's length to
    the cap if that is further: answers pinned at the limit are the drift the ratio cannot show. Stands down (None)
    when the reference already sits at the cap. Suspicious samples: the longest."""

    default_warmup = 3

    def __init__(self, threshold: float = 1.5, action: str = "queue", cap_fraction: float = 0.9, **kw):
        super().__init__(threshold, action, **kw)
        if not 0 < cap_fraction <= 1:
            raise ValueError(f"length_drift's cap_fraction must lie in (0, 1], got {cap_fraction}.")
        self.cap_fraction = cap_fraction

    def statistic(self, obs):
        ref, cap = obs.reference.get("length"), obs.reference.get("cap")
        if ref is None or (cap is not None and ref >= cap):
            return None
        return float(obs.lengths.float().mean()) / max(ref, 1.0)

    def effective_threshold(self, obs):
        ref, cap = obs.reference.get("length"), obs.reference.get("cap")
        if ref is None or cap is None:
            return self.threshold
        room = cap / max(ref, 1.0)  # the largest ratio the cap allows
        return min(self.threshold, max(self.cap_fraction * room, (1 + room) / 2))

    def null(self, obs):
        r = obs.reference
        return _ratio_null(r.get("length_sd"), max(r.get("length", 0.0), 1.0), len(obs.lengths), r.get("n"))

    def suspicious(self, obs, n):
        return torch.argsort(obs.lengths.float(), descending=True)[:n].tolist()


@register("detector", "repetition")
class RepetitionDetector(Detector):
    """Mean repeated-n-gram fraction of the responses' tokens (0 fresh, → 1 loops) *above the reference policy's*
    (lists and code repeat by nature); fires when the excess passes `threshold` (0.2: a fifth more of the tokens sit
    in repeated n-grams). Without a measured reference the excess is over 0."""

    def __init__(self, threshold: float = 0.2, action: str = "queue", n: int = 4, **kw):
        super().__init__(threshold, action, **kw)
        self.n = n

    def _frac(self, obs):
        return [repeated_ngram_fraction(x, self.n) for x in content_ids(obs.ids, obs.lengths)]

    def statistic(self, obs):
        f = self._frac(obs)
        return sum(f) / len(f) - obs.reference.get(f"repetition_{self.n}", 0.0) if f else None

    def null(self, obs):
        r, sd = obs.reference, obs.reference.get(f"repetition_{self.n}_sd")
        if sd is None or not r.get("n") or not obs.ids:
            return None
        return 0.0, sd / math.sqrt(len(obs.ids)), sd / math.sqrt(r["n"])

    def suspicious(self, obs, n):
        return torch.argsort(torch.tensor(self._frac(obs)), descending=True)[:n].tolist()


@register("detector", "disagreement")
class EnsembleDisagreement(Detector):
    """Ensemble std of the normalised member rewards (mean over samples), relative to its value over the first
    `baseline_iterations`; fires when it grows past `threshold` × baseline (members disagree on what the policy now
    writes: it left the data they agree on). Needs K > 1 members."""

    def __init__(self, threshold: float = 1.5, action: str = "log", baseline_iterations: int = 3, **kw):
        super().__init__(threshold, action, **kw)
        self.baseline_iterations, self.baseline, self.base_sum, self.base_n = baseline_iterations, None, 0.0, 0
        self._sd = None  # spread of the per-sample stds in the last batch: the noise of their mean

    def _std(self, obs):
        full = scored_by_every_member(obs.valid, obs.norm)
        if obs.norm.shape[1] < 2 or not full.any():
            return None
        return obs.norm[full].std(-1)

    def statistic(self, obs):
        s = self._std(obs)
        if s is None:
            return None
        x = float(s.mean())
        if self.base_n < self.baseline_iterations:
            self.base_sum, self.base_n = self.base_sum + x, self.base_n + 1
            self.baseline = self.base_sum / self.base_n
        self._sd = float(s.std()) if s.numel() > 1 else None
        return x / max(self.baseline, 1e-6)

    def null(self, obs):
        sd = self._sd
        if sd is None or self.base_n < self.baseline_iterations:
            return None
        b = max(self.baseline, 1e-6)
        batch = int(scored_by_every_member(obs.valid, obs.norm).sum())
        return 1.0, sd / b / math.sqrt(batch), sd / b / math.sqrt(batch * self.base_n)

    def suspicious(self, obs, n):
        s = self._std(obs)
        if s is None:
            return super().suspicious(obs, n)
        idx = torch.nonzero(scored_by_every_member(obs.valid, obs.norm)).flatten()
        return idx[torch.argsort(s, descending=True)[:n]].tolist()

    def state_dict(self):
        return {**super().state_dict(), "baseline": self.baseline, "base_sum": self.base_sum, "base_n": self.base_n}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.baseline, self.base_sum, self.base_n = state.get("baseline"), state.get("base_sum", 0.0), state.get("base_n", 0)


@register("detector", "proxy_vs_audit")
class ProxyVsAudit(Detector):
    """The proxy reward rising while an audit reward (e.g. a gold judge in `audit_funcs`) falls. The first `window`
    iterations are the baseline; after that, the statistic compares the last `window` iterations with it: the audit's
    drop in units of its own standard error, z = (audit_base − audit_recent) / √(s²_base/n_base + s²_recent/n_recent)
    from the per-sample audit scores, when the proxy's mean rose over the same span (else 0). Fires above `threshold`
    (3.0 standard errors) once the drop is also at least `min_effect` of the audit's per-sample standard deviation
    (a large batch makes tiny drops "significant"). A correlation of a few batch means, blind to effect size, alarmed
    in 82–93 % of simulated 30-iteration runs without hacking (benchmarks/detector_rates.py). Suspicious samples: high
    proxy, low audit. Needs `audit_funcs`. A score the audit could not give (None, NaN) is left out and counted
    (`dropped`, one warning): a single NaN in the sums would silence the detector for the rest of the run."""

    def __init__(self, threshold: float = 3.0, action: str = "queue", window: int = 4, audit: str | None = None,
                 min_effect: float = 0.2, **kw):
        kw.setdefault("smoothing", 0.0)
        super().__init__(threshold, action, **kw)
        if window < 1:
            raise ValueError(f"proxy_vs_audit's window must be ≥ 1 iteration, got {window}.")
        self.window, self.audit, self.min_effect = window, audit, min_effect
        self.batches: list = []  # per iteration: [proxy mean, audit Σx, audit Σx², audit count]
        self.watching: str | None = None  # the judge `batches` hold scores of (a resumed run may have other judges)
        self.dropped = 0  # audit scores left out of the sums: None, NaN or ±inf (the audit could not grade a sample)

    def _audit_name(self, obs):
        return self.audit or next(iter(obs.audit), None)

    def _finite_audit(self, obs, name) -> torch.Tensor:
        """The audit's scores that are numbers. A single NaN in the sums would make the baseline NaN for the rest of
        the run (it is kept, and checkpointed) and every later statistic NaN, which `update` ignores: the detector
        would go silent. So they are left out, counted, and the first is reported."""
        a = _audit_tensor(obs.audit[name])
        finite = torch.isfinite(a)
        bad = int((~finite).sum())
        if bad:
            if not self.dropped:
                warnings.warn(f"Audit {name!r} returned no number (None, NaN or ±inf) for {bad} of {a.numel()} "
                              f"samples at iteration {obs.iteration}; proxy_vs_audit leaves such scores out (it counts "
                              f"them in its state as 'dropped'). Return a number for every sample to have them "
                              f"judged.", stacklevel=2)
            self.dropped += bad
        return a[finite]

    def statistic(self, obs):
        name = self._audit_name(obs)
        if name is None or not obs.valid.any():
            return None
        if self.watching is not None and name != self.watching and self.batches:
            # resumed with another first judge (audit_model_paths changed, or put before audit_funcs): its scores
            # are on another scale than the baseline's, which would read as a drop or a rise: start a new baseline
            warnings.warn(f"proxy_vs_audit: the checkpoint's baseline is judge {self.watching!r}'s and this run's "
                          f"first judge is {name!r}; the baseline starts again ({self.window} iterations).",
                          stacklevel=2)
            self.batches = []
        self.watching = name
        a = self._finite_audit(obs, name)
        if not a.numel():  # nothing graded this iteration: it says nothing about the audit
            return None
        self.batches.append([float(obs.scores[obs.valid].mean()), float(a.sum()), float(a.pow(2).sum()), a.numel()])
        # keep the baseline and the recent window only
        self.batches = self.batches[: self.window] + self.batches[self.window :][-self.window :]
        if len(self.batches) < 2 * self.window:
            return 0.0
        base, recent = _pool(self.batches[: self.window]), _pool(self.batches[-self.window :])
        if recent["proxy"] <= base["proxy"]:
            return 0.0
        drop = base["mean"] - recent["mean"]
        se = math.sqrt(base["var"] / base["n"] + recent["var"] / recent["n"])
        sd = math.sqrt((base["var"] + recent["var"]) / 2)
        if drop < self.min_effect * sd:
            return 0.0
        return drop / max(se, 1e-12)

    def suspicious(self, obs, n):
        name = self._audit_name(obs)
        gap = obs.scores - _audit_tensor(obs.audit[name]).to(obs.scores.dtype)
        # an ungraded sample shows nothing about the audit: last, not first (argsort ranks NaN highest)
        gap = torch.where(torch.isnan(gap), torch.full_like(gap, -math.inf), gap)
        return torch.argsort(gap, descending=True)[:n].tolist()

    def state_dict(self):
        return {**super().state_dict(), "batches": self.batches, "dropped": self.dropped, "watching": self.watching}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        # a checkpoint from before non-finite scores were left out may hold NaN sums: those batches are dropped
        self.batches = [b for b in state.get("batches", []) if all(math.isfinite(x) for x in b)]
        self.dropped = state.get("dropped", 0)
        self.watching = state.get("watching")  # None in older checkpoints: taken as this run's first judge


def _audit_tensor(scores) -> torch.Tensor:
    """An audit's per-sample scores as float64, None (TRL's "not applicable") as NaN."""
    return torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float64)


def _pool(batches) -> dict:
    """Mean proxy, and the audit's mean, sample variance and count, over several iterations' batches."""
    n = sum(b[3] for b in batches)
    mean = sum(b[1] for b in batches) / n
    var = max(sum(b[2] for b in batches) / n - mean**2, 0.0) * n / max(n - 1, 1)
    return {"proxy": sum(b[0] for b in batches) / len(batches), "mean": mean, "var": var, "n": n}


@register("detector", "length_correlation")
class RewardLengthCorrelation(Detector):
    """Pearson correlation of the shaped reward with response length inside each rollout; fires above
    `threshold` (the reward is mostly paying for length)."""

    def __init__(self, threshold: float = 0.6, action: str = "log", **kw):
        super().__init__(threshold, action, **kw)

    def statistic(self, obs):
        v = obs.valid
        if int(v.sum()) < 3:
            return None
        return float(pearson(obs.lengths[v].float(), obs.scores[v].float()))

    def null(self, obs):
        b = int(obs.valid.sum())  # Pearson r of b independent pairs: mean 0, standard deviation ≈ 1/√(b − 1)
        return (0.0, 1 / math.sqrt(b - 1), 0.0) if b >= 3 else None

    def suspicious(self, obs, n):
        return LengthDrift.suspicious(self, obs, n)


@register("detector", "eos_collapse")
class EOSCollapse(Detector):
    """EOS rate relative to the reference policy's (1.0 = answers end as often as before); fires *below*
    `threshold` (default 0.5: half as many answers end). Suspicious samples: those that did not end."""

    direction = "below"
    default_warmup = 3

    def __init__(self, threshold: float = 0.5, action: str = "queue", min_reference: float = 0.2, **kw):
        super().__init__(threshold, action, **kw)
        self.min_reference = min_reference

    def statistic(self, obs):
        ref = obs.reference.get("eos")
        if ref is None or ref < self.min_reference:  # the reference itself rarely ends: nothing to collapse
            return None
        return float(obs.has_eos.float().mean()) / ref

    def null(self, obs):
        p = obs.reference.get("eos")
        return _ratio_null(math.sqrt(p * (1 - p)), p, len(obs.has_eos), obs.reference.get("n")) if p else None

    def suspicious(self, obs, n):
        order = torch.argsort(obs.has_eos.float() - 1e-3 * obs.lengths.float())
        return order[:n].tolist()


@register("detector", "kl_backtracking")
class KLBacktracking(Detector):
    """Fraction of the last `window` iterations in which the hard-KL guard had to backtrack, restore or shrink;
    fires above `threshold` (the policy keeps pushing against δ: β or δ needs attention), judged on full windows
    only. With a guard acting at random in one iteration of ten, 3 of 5 happened in 20 % of 30-iteration runs; 5 of
    8 in under 1 %."""

    def __init__(self, threshold: float = 0.5, action: str = "log", window: int = 8, **kw):
        kw.setdefault("smoothing", 0.0)
        kw.setdefault("warmup", window)
        super().__init__(threshold, action, **kw)
        self.window, self.hist = window, []

    def statistic(self, obs):
        m = obs.metrics
        if "kl/backtracks" not in m:
            return None
        acted = (m.get("kl/backtracks", 0) + m.get("kl/restored", 0) + m.get("kl/shrunk", 0)) > 0
        self.hist = (self.hist + [float(acted)])[-self.window :]
        return sum(self.hist) / len(self.hist)

    def state_dict(self):
        return {**super().state_dict(), "hist": self.hist}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.hist = state.get("hist", [])


DEFAULT_DETECTORS = ["length_drift", "repetition", "disagreement", "proxy_vs_audit", "length_correlation",
                     "eos_collapse", "kl_backtracking"]
