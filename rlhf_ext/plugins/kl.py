"""KL estimators and KL controllers (plugins), the hard-constraint guard, and a callback that drives TRL
trainers' `beta`.

Estimators act per sampled token with r = π/π_ref (Schulman, "Approximating KL divergence"):
  k1 = log r,   k2 = ½ (log r)²,   k3 = (r⁻¹ − 1) + log r.

Controllers see one KL number per PPO iteration (the batch mean of the per-sequence KL, in nats) and set β.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from ..registry import build, register


# ----------------------------------------------------------------------------------------------- estimators
class KLEstimator:
    name = "base"

    def __call__(self, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
        """Per-token KL estimate. logp, ref_logp: [B, T] log-probs of the sampled tokens → [B, T]."""
        raise NotImplementedError


@register("kl_estimator", "k1")
class K1(KLEstimator):
    def __call__(self, logp, ref_logp):
        return logp - ref_logp  # log r: unbiased, high variance, can be negative


@register("kl_estimator", "k2")
class K2(KLEstimator):
    def __call__(self, logp, ref_logp):
        return 0.5 * (logp - ref_logp) ** 2  # ½(log r)²: low variance, biased, ≥ 0


@register("kl_estimator", "k3")
class K3(KLEstimator):
    def __call__(self, logp, ref_logp):
        log_r = logp - ref_logp
        return torch.expm1(-log_r) + log_r  # (r⁻¹ − 1) + log r: unbiased and ≥ 0


# ---------------------------------------------------------------------------------------------- controllers
class KLController:
    """β for the per-token KL penalty. `enforce` controllers also make the trainer keep KL ≤ target."""

    name = "base"
    enforce = False

    def __init__(self, init_beta: float = 0.05, target: float | None = None):
        if not math.isfinite(init_beta) or init_beta < 0:
            raise ValueError(f"init_beta must be a finite number ≥ 0, got {init_beta}.")
        if target is not None and (not math.isfinite(target) or target <= 0):
            raise ValueError(f"The KL target δ must be > 0 (nats per sequence), got {target}. Set `kl_target` > 0.")
        self.beta = float(init_beta)
        self.target = target

    def update(self, kl: float, n_steps: int = 1) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if isinstance(v, (int, float, type(None)))}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


@register("kl_controller", "fixed")
class FixedKL(KLController):
    """β constant."""


@register("kl_controller", "adaptive")
class AdaptiveKL(KLController):
    """Ziegler et al. (2019): e = clip(KL/target − 1, ±0.2); β ← β·(1 + e·n_steps/horizon)."""

    def __init__(self, init_beta: float = 0.05, target: float = 6.0, horizon: int = 10000):
        super().__init__(init_beta, target)
        if target is None:
            raise ValueError("The adaptive KL controller needs `kl_target`.")
        self.horizon = horizon

    def update(self, kl, n_steps=1):
        e = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + e * n_steps / self.horizon
        return self.beta


@register("kl_controller", "lagrangian")
class LagrangianKL(KLController):
    """Dual ascent on β for max E[r] s.t. KL ≤ δ, in PID form (Stooke et al. 2020).

    I ← clip(I + k_i·(KL − δ), 0, β_max);  β = clip(I + k_p·e + k_d·(e − e_prev), 0, β_max).
    With k_p = k_d = 0 this is plain dual ascent: β ← max(0, β + η·(KL − δ)). The integral is clamped to
    [0, β_max] (anti-windup): a burst of KL far above δ saturates β at β_max, and β starts falling on the first
    iteration back under δ instead of first unwinding an integral that grew far past β_max.
    """

    def __init__(self, init_beta=0.05, target=4.0, lr=0.02, kp=0.0, kd=0.0, beta_max=10.0):
        super().__init__(init_beta, target)
        if target is None:
            raise ValueError("The lagrangian KL controller needs `kl_target` (δ).")
        self.lr, self.kp, self.kd, self.beta_max = lr, kp, kd, beta_max
        self.integral, self.prev_error = float(init_beta), 0.0

    def update(self, kl, n_steps=1):
        e = kl - self.target
        self.integral = min(max(0.0, self.integral + self.lr * e), self.beta_max)
        self.beta = min(max(self.integral + self.kp * e + self.kd * (e - self.prev_error), 0.0), self.beta_max)
        self.prev_error = e
        return self.beta


@register("kl_controller", "hard")
class HardKL(LagrangianKL):
    """Lagrangian β plus per-update enforcement by `KLGuard`: an update that leaves the batch KL above δ is
    backtracked and the remaining epochs are skipped. β keeps the penalty in the reward, so the guard rarely acts."""

    enforce = True

    def __init__(self, init_beta=0.05, target=4.0, lr=0.02, kp=0.0, kd=0.0, beta_max=10.0,
                 backtrack_factor=0.5, max_backtracks=6, max_shrinks=12):
        super().__init__(init_beta, target, lr, kp, kd, beta_max)
        if not 0 < backtrack_factor < 1:
            raise ValueError(f"backtrack_factor must lie in (0, 1), got {backtrack_factor}.")
        self.backtrack_factor, self.max_backtracks, self.max_shrinks = backtrack_factor, max_backtracks, max_shrinks

    def guard(self, params, anchor) -> "KLGuard":
        return KLGuard(self.target, params, anchor, self.backtrack_factor, self.max_backtracks, self.max_shrinks)


class KLGuard:
    """The hard constraint KL(π_θ ‖ π_ref) ≤ δ, restored after every update that breaks it.

    **Contract.** After every PPO iteration,

        KL_batch(θ) = 1/B · Σ_b Σ_{t ∈ response_b} Σ_v π_θ(v | s_bt) · (log π_θ(v | s_bt) − log π_ref(v | s_bt)) ≤ δ

    over the B sequences sampled in that iteration (every sampled sequence, dropped rewards included), at every
    response state s_bt (prompt + the response tokens before t, up to and including the EOS-emitting state), with
    the exact sum over the whole vocabulary (no sampled estimator), π and π_ref at the sampling temperature T,
    both computed by the model's own forward in eval mode (no dropout), π_ref being the same model with every
    adapter disabled. It holds for any adapter type whose initial state *is* π_ref (LoRA, DoRA, LoRA on
    `lm_head` or embeddings, fp32/bf16 or 4-bit base) — checked at start-up, which refuses adapters that are not
    (PiSSA/OLoRA-style initialisations that rewrite the base, or an already-trained adapter). It is a statement
    about the rollout batch: KL on unseen prompts is measured (`evaluate_policy`), not bounded.

    **Mechanism** (`enforce`, called with the measured KL of the update just made):
      1. backtrack along the step: θ_b + α(θ − θ_b), α = f, f², … (TRPO-style line search), θ_b the parameters
         before the update;
      2. restore θ_b by copying (never b + 0·(a − b), which is NaN when the update was NaN);
      3. shrink towards the anchor θ_0 (the adapter's initial state, = π_ref): θ_0 + c(θ_b − θ_0), c = f, f², …,
         and finally c = 0, which is π_ref exactly (KL 0), so the loop always ends feasible.
    A measured KL that is NaN/inf counts as a violation.
    """

    def __init__(self, delta: float, params: list[torch.Tensor], anchor: list[torch.Tensor], backtrack_factor=0.5,
                 max_backtracks=6, max_shrinks=12):
        if len(params) != len(anchor):
            raise ValueError("KLGuard needs one anchor tensor per guarded parameter.")
        self.delta, self.params, self.anchor = float(delta), list(params), [a.detach().clone() for a in anchor]
        self.f, self.max_backtracks, self.max_shrinks = backtrack_factor, max_backtracks, max_shrinks

    def feasible(self, kl: float) -> bool:
        return math.isfinite(kl) and kl <= self.delta

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def _set(self, base: list[torch.Tensor], towards: list[torch.Tensor] | None = None, scale: float = 0.0):
        """θ ← base + scale·(towards − base); scale 0 copies `base` exactly."""
        for p, b, t in zip(self.params, base, towards or base):
            p.copy_(b if scale == 0.0 or towards is None else b + scale * (t - b))

    @torch.no_grad()
    def enforce(self, before: list[torch.Tensor], kl: float, measure, stats: dict) -> float:
        """Bring the parameters back to KL ≤ δ. `measure()` → the batch KL at the current parameters."""
        if self.feasible(kl):
            return kl
        after = self.snapshot()
        if all(torch.isfinite(a).all() for a in after):
            alpha = 1.0
            for _ in range(self.max_backtracks):  # 1. line search along the step
                alpha *= self.f
                self._set(before, after, alpha)
                stats["kl/backtracks"] = stats.get("kl/backtracks", 0) + 1
                kl = measure()
                if self.feasible(kl):
                    return kl
        self._set(before)  # 2. the parameters before the update, copied
        stats["kl/restored"] = stats.get("kl/restored", 0) + 1
        kl = measure()
        c = 1.0
        for step in range(self.max_shrinks + 1):  # 3. towards π_ref; the last candidate (c = 0) is π_ref itself
            if self.feasible(kl):
                return kl
            c = c * self.f if step < self.max_shrinks else 0.0
            self._set(self.anchor, before, c)
            stats["kl/shrunk"] = stats.get("kl/shrunk", 0) + 1
            kl = measure()
        if not self.feasible(kl):
            raise RuntimeError(f"KL guard: the anchor (adapter at its initial state) measured KL {kl} > δ "
                               f"{self.delta}; it should be π_ref exactly. Please report this with your PEFT config.")
        return kl


def build_controller(name: str, init_beta: float, target: float | None, **kwargs) -> KLController:
    if name != "fixed" and target is None:
        raise ValueError(f"KL controller {name!r} needs `kl_target` (δ, nats per sequence).")
    kw = dict(init_beta=init_beta, **kwargs)
    if name != "fixed":
        kw["target"] = target
    return build("kl_controller", name, **kw)


class KLControllerCallback(TrainerCallback):
    """Drive `trainer.beta` of TRL's GRPOTrainer / RLOOTrainer with any KL controller.

    Reads the logged `kl` (TRL logs a per-token mean, so set the controller target in those units) and writes
    the new β back. β is kept ≥ `min_beta` > 0 because TRL skips the reference pass entirely when β == 0.
    """

    def __init__(self, controller: KLController, trainer=None, min_beta: float = 1e-6):
        self.controller, self.trainer, self.min_beta = controller, trainer, min_beta

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "kl" not in logs or self.trainer is None:
            return
        beta = max(self.controller.update(float(logs["kl"]), n_steps=1), self.min_beta)
        self.trainer.beta = beta
        logs["kl_controller/beta"] = beta
        if state.log_history:  # Trainer appended a copy of `logs` before calling us
            state.log_history[-1]["kl_controller/beta"] = beta
