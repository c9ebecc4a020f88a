"""Reward aggregation plugins: K normalised member rewards → one score per sample.

Members must be normalised first (Bradley–Terry rewards are shift-invariant): only then do `min`, `uwo` and the
ensemble variance mean anything. See `rlhf_ext.reward.pipeline.RewardPipeline`.
"""

from __future__ import annotations

import torch

from ..registry import register


class Aggregator:
    name = "base"
    # rows a Python reward function marked not applicable (None, TRL's contract): with True they come in a call of
    # their own without that member's column (r: [B, k], k < K); with False (a plugin written for K columns) they are
    # dropped, with a warning. `mean` and `weighted` take TRL's nansum instead (reward/pipeline.py: _over_members)
    missing_members = False

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """r: [B, K] normalised member rewards → [B] (a float tensor; checked by the reward pipeline)."""
        raise NotImplementedError(f"The aggregation {self.name!r} must implement __call__(r [B, K]) -> [B].")


@register("aggregation", "mean")
class Mean(Aggregator):
    def __call__(self, r):
        return r.mean(-1)


@register("aggregation", "min")
class WorstCase(Aggregator):
    """WCO (Coste et al. 2023): min_i r_i."""
    missing_members = True

    def __call__(self, r):
        return r.min(-1).values


@register("aggregation", "uwo")
class UncertaintyWeighted(Aggregator):
    """UWO (Coste et al. 2023): mean_i r_i − λ·var_i r_i."""
    missing_members = True

    def __init__(self, lam: float = 1.0):
        self.lam = lam

    def __call__(self, r):
        var = r.var(-1, unbiased=False) if r.shape[-1] > 1 else torch.zeros_like(r[..., 0])
        return r.mean(-1) - self.lam * var


@register("aggregation", "median")
class Median(Aggregator):
    missing_members = True
    def __call__(self, r):
        return r.median(-1).values if r.shape[-1] % 2 else r.sort(-1).values[..., r.shape[-1] // 2 - 1 : r.shape[-1] // 2 + 1].mean(-1)


@register("aggregation", "weighted")
class Weighted(Aggregator):
    """Σ_i w_i·r_i / Σ_i |w_i|: a weighted mean of the normalised members, one weight per member column (an artifact
    of K members contributes K columns). A negative weight lowers the score as that member's reward rises (TRL's
    `reward_weights` allow them). TRL sums instead (Σ_i w_i·r_i): for its numbers, the scores here are those
    divided by Σ|w_i| — with a KL penalty, β acts Σ|w_i| times as strongly."""

    def __init__(self, weights: list[float]):
        self.weights = torch.tensor(weights, dtype=torch.float)
        if not torch.isfinite(self.weights).all() or self.weights.abs().sum() <= 0:
            raise ValueError(f"weighted aggregation needs finite weights, not all zero, got {weights}.")

    def __call__(self, r):
        if r.shape[-1] != len(self.weights):
            raise ValueError(f"weighted aggregation has {len(self.weights)} weights for {r.shape[-1]} members.")
        w = self.weights.to(r)
        return (r * w).sum(-1) / w.abs().sum()
