"""KL estimators and KL controllers (plugins), the hard-constraint guard, and a callback that drives TRL
trainers' `beta`.

Estimators act per sampled token with r = π/π_ref (Schulman, "Approximating KL divergence"):
  k1 = log r,   k2 = ½ (log r)²,   k3 = (r⁻¹ − 1) + log r.
They estimate the KL's *value* (logged as objective/kl, fed to the controllers). As a per-token *reward* only k1 has
the right gradient: E_π[k1 · ∇log π] = ∇KL(π‖π_ref) exactly, while k2's and k3's reward-form gradients point
elsewhere (exact expectation on random categoricals: mean cosine with ∇KL 0.90 for k2, 0.54 for k3; computed in
tests/test_ppo_core.py) — so the PPO penalty −β·kl_t always uses k1.

Controllers see one KL number per PPO iteration (the batch mean of the per-sequence KL, in nats) and set β.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..registry import build, register


# ----------------------------------------------------------------------------------------------- estimators
class KLEstimator:
    name = "base"

    def __call__(self, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
        """Per-token KL estimate. logp, ref_logp: [B, T] log-probs of the sampled tokens → [B, T] (a float tensor of
        their shape; the trainer checks it and hands the estimator copies)."""
        raise NotImplementedError(f"The kl_estimator {self.name!r} must implement __call__(logp, ref_logp) -> [B, T].")


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

    # What `update` changes: saved with a checkpoint and restored on resume. Everything else — `target`, gains,
    # horizon — is configuration: a resumed run keeps the values it was configured with (as its hard-KL guard, built
    # from them, does). None, for a plugin that does not say: every number it holds but `target` (a resume warns where
    # one of them differs from the configured value).
    state_keys: tuple[str, ...] | None = None

    def update(self, kl: float, n_steps: int = 1) -> float:
        return self.beta

    def _state_keys(self, candidates) -> list[str]:
        if self.state_keys is not None:
            return list(self.state_keys)
        return [k for k in candidates if k not in ("target", "controller")]

    def state_dict(self) -> dict:
        numbers = [k for k, v in vars(self).items() if isinstance(v, (int, float, type(None)))]
        return {"controller": self.name, **{k: getattr(self, k) for k in self._state_keys(numbers)}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `update` changed. A state saved by another kind of controller (its "controller" name; older
        checkpoints have none) means something else — an adaptive β is not a Lagrange multiplier — so it is not
        loaded: this controller starts from its configured β, with a warning."""
        saved = state.get("controller", self.name)
        if saved != self.name:
            warnings.warn(f"The KL controller state saved by a {saved!r} controller was not loaded into this "
                          f"{self.name!r} one (kl_controller changed): β starts at init_kl_coef ({self.beta:g}). "
                          f"Resume with kl_controller={saved!r} to continue its β.", UserWarning, stacklevel=2)
            return
        restored = {k: state[k] for k in self._state_keys(state) if k in state}
        if self.state_keys is None:  # a plugin that does not say what its state is: a changed setting came back too
            differ = [f"{k}={v!r} (configured {getattr(self, k, None)!r})" for k, v in restored.items()
                      if k != "beta" and v != getattr(self, k, None)]
            if differ:
                warnings.warn(f"The {self.name!r} KL controller declares no state_keys, so every number it held was "
                              f"restored from the checkpoint: {', '.join(differ)}. If one of these is configuration "
                              f"(kl_controller_kwargs), declare the state on the class — state_keys = (\"beta\", ...) "
                              f"— and the configured value is kept.", UserWarning, stacklevel=2)
        vars(self).update(restored)


@register("kl_controller", "fixed")
class FixedKL(KLController):
    """β constant."""

    state_keys = ()  # β is init_kl_coef: configuration


@register("kl_controller", "adaptive")
class AdaptiveKL(KLController):
    """Ziegler et al. (2019): e = clip(KL/target − 1, ±0.2); β ← β·(1 + e·n_steps/horizon)."""

    state_keys = ("beta",)

    def __init__(self, init_beta: float = 0.05, target: float = 6.0, horizon: int = 10000):
        super().__init__(init_beta, target)
        if target is None:
            raise ValueError("The adaptive KL controller needs `kl_target`.")
        if not (isinstance(horizon, (int, float)) and math.isfinite(horizon) and horizon > 0):
            # 0 divided by zero at the end of the first iteration; a negative one raised β while KL was below target
            raise ValueError(f"The adaptive KL controller's horizon must be a finite number > 0 (samples over which β "
                             f"may change by ±20 %; Ziegler et al. used 10000), got {horizon!r}.")
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

    state_keys = ("beta", "integral", "prev_error")

    def __init__(self, init_beta=0.05, target=4.0, lr=0.02, kp=0.0, kd=0.0, beta_max=10.0):
        super().__init__(init_beta, target)
        if target is None:
            raise ValueError("The lagrangian KL controller needs `kl_target` (δ).")
        for name, v in (("lr", lr), ("kp", kp), ("kd", kd), ("beta_max", beta_max)):
            # a negative gain moves β the wrong way (up while KL is under δ); NaN silently made β 0 for good
            if not (isinstance(v, (int, float)) and v >= 0 and (math.isfinite(v) or name == "beta_max")):
                raise ValueError(f"The {self.name} KL controller's {name} must be a finite number ≥ 0"
                                 f"{' (or inf: no cap)' if name == 'beta_max' else ''}, got {v!r}.")
        if init_beta > beta_max:  # the first update clamps β (and the integral) to beta_max: init_kl_coef ignored
            raise ValueError(f"init_kl_coef (the initial β, {init_beta:g}) is above the {self.name} controller's "
                             f"beta_max ({beta_max:g}): β would be cut to {beta_max:g} after the first iteration. Raise "
                             f"it with kl_controller_kwargs={{'beta_max': {init_beta:g}}}, or lower init_kl_coef.")
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
                 backtrack_factor=None, max_backtracks=6, max_shrinks=12):
        super().__init__(init_beta, target, lr, kp, kd, beta_max)
        if backtrack_factor is not None:  # the guard bisects (KLGuard._bisect); a fixed factor is no longer used
            if not 0 < backtrack_factor < 1:
                raise ValueError(f"backtrack_factor must lie in (0, 1), got {backtrack_factor}.")
            warnings.warn(f"backtrack_factor={backtrack_factor} has no effect: the hard-KL guard searches the step by "
                          f"bisection until KL lands in [0.9 δ, δ] (max_backtracks measurements at most). Remove it "
                          f"from kl_controller_kwargs.", UserWarning, stacklevel=3)
        for name, v in (("max_backtracks", max_backtracks), ("max_shrinks", max_shrinks)):
            if not (isinstance(v, int) and v >= 0):
                raise ValueError(f"{name} must be an integer ≥ 0 (KL measurements the guard may spend), got {v!r}.")
        self.backtrack_factor = 0.5 if backtrack_factor is None else backtrack_factor
        self.max_backtracks, self.max_shrinks = max_backtracks, max_shrinks

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

    **Mechanism** (`enforce`, called with the measured KL of the update just made, and the KL before it when known):
      1. along the step, θ_b + α(θ − θ_b) with θ_b the parameters before the update: when θ_b was feasible on this
         batch, KL(α) runs from KL(θ_b) ≤ δ to KL(θ) > δ, smoothly and (in practice) monotonically, so α is
         searched by a safeguarded bisection (guesses from a quadratic model) until KL lands in [0.9 δ, δ] — keeping
         most of the update (halving α blindly, then restoring, used to end at 16 % of δ after 8 measurements);
      2. when θ_b itself is above δ on this batch (a fresh batch can find it there; known from `kl_before`, so no
         measurement is wasted on the step), or the update is not finite: restore θ_b by copying (never
         b + 0·(a − b), which is NaN when the update was NaN), then bisect c in θ_0 + c(θ_b − θ_0) towards the
         anchor θ_0 (the adapter's initial state, = π_ref, KL 0), first guess c = √(0.95 δ / KL(θ_b));
      3. a bisection that finds no feasible point in its budget ends at its feasible end: θ_b (step) or θ_0 (anchor,
         KL 0 exactly), so the loop always ends feasible.
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

    def _bisect(self, base, towards, kl_lo: float, kl_hi: float, measure, stats: dict, key: str,
                steps: int) -> tuple[float, float]:
        """θ = base + s(towards − base), KL(0) = kl_lo ≤ δ < KL(1) = kl_hi: the largest s found with KL ≤ δ, stopping
        as soon as KL ∈ [0.9 δ, δ]. Each guess interpolates the bracket with KL linear in s² (exact near the
        reference, where KL is quadratic in the parameters). Safeguards, for KL that saturates along a large step (the
        model is then far off): after one guess above δ the next is at most the midpoint, after two at most a fifth
        of the way, and every guess stays inside the bracket's middle 80 %. Leaves the parameters at the best point;
        returns (s, KL)."""
        lo, hi, best = (0.0, kl_lo), (1.0, kl_hi), (0.0, kl_lo)
        target, misses = 0.95 * self.delta, 0
        for _ in range(steps):
            (s_lo, k_lo), (s_hi, k_hi) = lo, hi
            if math.isfinite(k_hi) and k_hi > k_lo:
                s2 = s_lo ** 2 + (target - k_lo) * (s_hi ** 2 - s_lo ** 2) / (k_hi - k_lo)
                s = math.sqrt(max(s2, 0.0))
            else:
                s = (s_lo + s_hi) / 2
            if misses:
                s = min(s, s_lo + (0.5 if misses == 1 else 0.2) * (s_hi - s_lo))
            margin = 0.1 * (s_hi - s_lo)
            s = min(max(s, s_lo + margin), s_hi - margin)
            self._set(base, towards, s)
            stats[key] = stats.get(key, 0) + 1
            kl = measure()
            if self.feasible(kl):
                lo = best = (s, kl)
                misses = 0
                if kl >= 0.9 * self.delta:
                    return best
            else:
                hi = (s, kl)
                misses += 1
        self._set(base, towards, best[0])  # the best feasible point measured (s = 0: base, copied exactly)
        return best

    @torch.no_grad()
    def enforce(self, before: list[torch.Tensor], kl: float, measure, stats: dict, kl_before: float | None = None) -> float:
        """Bring the parameters back to KL ≤ δ. `measure()` → the batch KL at the current parameters; `kl_before`: the
        batch KL at `before`, when it was measured (saves a measurement and skips a search that cannot help)."""
        if self.feasible(kl):
            return kl
        after = self.snapshot()
        step_ok = all(torch.isfinite(a).all() for a in after)
        if kl_before is None or not step_ok:
            self._set(before)  # restore θ_b by copying, and see where it stands on this batch
            stats["kl/restored"] = stats.get("kl/restored", 0) + 1
            kl_before = measure()
            if self.feasible(kl_before) and not step_ok:
                return kl_before
        if self.feasible(kl_before):  # 1. bisect along the step
            s, kl = self._bisect(before, after, kl_before, kl, measure, stats, "kl/backtracks", self.max_backtracks)
            if s == 0.0:
                stats["kl/restored"] = stats.get("kl/restored", 0) + 1
            return kl
        # 2. θ_b is outside δ on this batch: bisect towards the anchor (π_ref, KL 0)
        s, kl = self._bisect(self.anchor, before, 0.0, kl_before, measure, stats, "kl/shrunk", self.max_shrinks)
        if s == 0.0:  # ended at the anchor itself: it must be π_ref
            stats["kl/shrunk"] += 1
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


def __getattr__(name):  # KLControllerCallback lives in kl_callback.py: listing plugins must not import transformers
    if name == "KLControllerCallback":
        from .kl_callback import KLControllerCallback

        return KLControllerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
