"""Reward-hacking detectors (plugins, registry point `detector`).

Each iteration a detector reads one `Observation` (the rollout's lengths, EOS flags, texts, normalised member
rewards, shaped scores, audit scores, and the iteration's metrics), updates a smoothed statistic, and fires when it
crosses its threshold. The statistic is logged every iteration (`monitor/<name>`); what happens on firing is the
detector's `action`: "log" (an alarm in the logs), "queue" (its most suspicious samples go to the review queue beside
a reference-policy sample for the same prompt), or "halt" (checkpoint, stop, say what fired and how to resume).

Thresholds are relative to the *reference policy* where that makes sense (its response length and EOS rate are
measured once at the start of training on the same prompts), so they carry over between tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..registry import register
from .shaping import repeated_ngram_fraction

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

    def __init__(self, threshold: float, action: str = "log", smoothing: float = 0.5, warmup: int | None = None):
        if action not in ACTIONS:
            raise ValueError(f"Detector action must be one of {ACTIONS}, got {action!r}.")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}.")
        self.threshold, self.action, self.smoothing = float(threshold), action, smoothing
        self.warmup = self.default_warmup if warmup is None else warmup
        self.value, self.seen, self.limit = None, 0, float(threshold)

    def statistic(self, obs: Observation) -> float | None:
        raise NotImplementedError

    def effective_threshold(self, obs: Observation) -> float:
        """The threshold this iteration is judged against (default: the configured one)."""
        return self.threshold

    def suspicious(self, obs: Observation, n: int) -> list[int]:
        """Indices of the n samples that best show the problem (default: highest shaped reward)."""
        return torch.argsort(obs.scores, descending=True)[:n].tolist()

    def update(self, obs: Observation) -> tuple[float | None, bool]:
        x = self.statistic(obs)
        if x is None or not math.isfinite(x):
            return self.value, False
        self.value = x if self.value is None else self.smoothing * self.value + (1 - self.smoothing) * x
        self.seen += 1
        self.limit = self.effective_threshold(obs)
        fired = self.value > self.limit if self.direction == "above" else self.value < self.limit
        return self.value, bool(fired and self.seen >= self.warmup)

    def describe(self) -> str:
        return f"{self.name} = {self.value:.3g} {'>' if self.direction == 'above' else '<'} {self.limit:.3g}"

    def state_dict(self) -> dict:
        return {"value": self.value, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.seen = state.get("value"), state.get("seen", 0)


# Length and EOS drift compare one batch's mean with the reference policy's: with prompts of different kinds a single
# batch can sit far from it before the policy has moved (a batch of open questions among one-line requests: 1.76×
# the reference length at iteration 1). Drift is a trend, so these two judge the smoothed value from the third
# iteration on (`default_warmup = 3`).


@register("detector", "length_drift")
class LengthDrift(Detector):
    """Mean response length relative to the reference policy's (1.0 = same); fires above `threshold` (default 1.5:
    50 % longer). When the completion cap leaves no room for that ratio (cap < threshold × reference length), it
    fires instead once the mean length reaches `cap_fraction` of the cap: answers pinned at the limit are the drift
    the ratio cannot show (never below 1.1× the reference). Suspicious samples: the longest."""

    default_warmup = 3

    def __init__(self, threshold: float = 1.5, action: str = "queue", cap_fraction: float = 0.9, **kw):
        super().__init__(threshold, action, **kw)
        if not 0 < cap_fraction <= 1:
            raise ValueError(f"length_drift's cap_fraction must lie in (0, 1], got {cap_fraction}.")
        self.cap_fraction = cap_fraction

    def statistic(self, obs):
        ref = obs.reference.get("length")
        return float(obs.lengths.float().mean()) / max(ref, 1.0) if ref is not None else None

    def effective_threshold(self, obs):
        ref, cap = obs.reference.get("length"), obs.reference.get("cap")
        if ref is None or cap is None:
            return self.threshold
        return min(self.threshold, max(self.cap_fraction * cap / max(ref, 1.0), 1.1))

    def suspicious(self, obs, n):
        return torch.argsort(obs.lengths.float(), descending=True)[:n].tolist()


@register("detector", "repetition")
class RepetitionDetector(Detector):
    """Mean repeated-n-gram fraction of the responses' tokens (0 fresh, → 1 loops); fires above `threshold`."""

    def __init__(self, threshold: float = 0.2, action: str = "queue", n: int = 4, **kw):
        super().__init__(threshold, action, **kw)
        self.n = n

    def _frac(self, obs):
        return [repeated_ngram_fraction(x, self.n) for x in obs.ids]

    def statistic(self, obs):
        f = self._frac(obs)
        return sum(f) / len(f) if f else None

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

    def _std(self, obs):
        if obs.norm.shape[1] < 2 or not obs.valid.any():
            return None
        return obs.norm[obs.valid].std(-1)

    def statistic(self, obs):
        s = self._std(obs)
        if s is None:
            return None
        x = float(s.mean())
        if self.base_n < self.baseline_iterations:
            self.base_sum, self.base_n = self.base_sum + x, self.base_n + 1
            self.baseline = self.base_sum / self.base_n
        return x / max(self.baseline, 1e-6)

    def suspicious(self, obs, n):
        s = self._std(obs)
        if s is None:
            return super().suspicious(obs, n)
        idx = torch.nonzero(obs.valid).flatten()
        return idx[torch.argsort(s, descending=True)[:n]].tolist()

    def state_dict(self):
        return {**super().state_dict(), "baseline": self.baseline, "base_sum": self.base_sum, "base_n": self.base_n}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.baseline, self.base_sum, self.base_n = state.get("baseline"), state.get("base_sum", 0.0), state.get("base_n", 0)


@register("detector", "proxy_vs_audit")
class ProxyVsAudit(Detector):
    """The proxy reward rising while an audit reward (e.g. a gold judge in `audit_funcs`) falls: over the last
    `window` iterations, the statistic is −corr(iteration, audit) when corr(iteration, proxy) > 0, else 0; fires
    above `threshold`. Suspicious samples: high proxy, low audit. Needs `audit_funcs`."""

    def __init__(self, threshold: float = 0.6, action: str = "queue", window: int = 6, audit: str | None = None, **kw):
        kw.setdefault("smoothing", 0.0)
        super().__init__(threshold, action, **kw)
        self.window, self.audit, self.proxy_hist, self.audit_hist = window, audit, [], []

    def _audit_name(self, obs):
        return self.audit or next(iter(obs.audit), None)

    def statistic(self, obs):
        name = self._audit_name(obs)
        if name is None:
            return None
        self.proxy_hist = (self.proxy_hist + [float(obs.scores[obs.valid].mean())])[-self.window :]
        self.audit_hist = (self.audit_hist + [sum(obs.audit[name]) / len(obs.audit[name])])[-self.window :]
        if len(self.proxy_hist) < self.window:
            return 0.0
        t = torch.arange(self.window, dtype=torch.float)
        c_proxy, c_audit = _corr(t, torch.tensor(self.proxy_hist)), _corr(t, torch.tensor(self.audit_hist))
        return max(0.0, -c_audit) if c_proxy > 0 else 0.0

    def suspicious(self, obs, n):
        name = self._audit_name(obs)
        gap = obs.scores - torch.tensor(obs.audit[name], dtype=obs.scores.dtype)
        return torch.argsort(gap, descending=True)[:n].tolist()

    def state_dict(self):
        return {**super().state_dict(), "proxy_hist": self.proxy_hist, "audit_hist": self.audit_hist}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.proxy_hist, self.audit_hist = state.get("proxy_hist", []), state.get("audit_hist", [])


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
        return float(_corr(obs.lengths[v].float(), obs.scores[v].float()))

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

    def suspicious(self, obs, n):
        order = torch.argsort(obs.has_eos.float() - 1e-3 * obs.lengths.float())
        return order[:n].tolist()


@register("detector", "kl_backtracking")
class KLBacktracking(Detector):
    """Fraction of the last `window` iterations in which the hard-KL guard had to backtrack, restore or shrink;
    fires above `threshold` (the policy keeps pushing against δ: β or δ needs attention)."""

    def __init__(self, threshold: float = 0.5, action: str = "log", window: int = 5, **kw):
        kw.setdefault("smoothing", 0.0)
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


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    d = float((x.pow(2).sum() * y.pow(2).sum()).sqrt())
    return float((x * y).sum()) / d if d > 0 else 0.0


DEFAULT_DETECTORS = ["length_drift", "repetition", "disagreement", "proxy_vs_audit", "length_correlation",
                     "eos_collapse", "kl_backtracking"]
