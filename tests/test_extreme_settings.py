"""Settings at the edge of what PPOConfig and the KL controllers accept: each either trains correctly or is refused
(or said) at start-up, never accepted and then ignored, nor a raw error mid-run."""

from __future__ import annotations

import math
import warnings

import pytest
from datasets import Dataset

from rlhf_ext import PPOConfig
from rlhf_ext.plugins.kl import build_controller

from .kl_oracle import exact_batch_kl
from .test_ppo import make


def _said(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, " ".join(str(w.message) for w in caught)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_a_non_finite_temperature_is_refused(tmp_path, temperature):
    """NaN passed `temperature <= 0` and failed at start-up blaming DoRA; inf sampled uniformly and trained nothing."""
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        PPOConfig(str(tmp_path), use_cpu=True, temperature=temperature)


@pytest.mark.parametrize("field", ["monitor_max_queue", "monitor_cooldown"])
def test_negative_monitor_counts_are_refused(tmp_path, field):
    """monitor_max_queue=-1 sliced the suspicious samples to all but four and queued every one of them."""
    with pytest.raises(ValueError, match=f"{field} must be >= 0"):
        PPOConfig(str(tmp_path), use_cpu=True, **{field: -1})
    assert PPOConfig(str(tmp_path), use_cpu=True, monitor_max_queue=0).monitor_max_queue == 0


def test_kl_target_with_the_fixed_controller_is_said(tmp_path):
    _, said = _said(lambda: PPOConfig(str(tmp_path), use_cpu=True, kl_controller="fixed", kl_target=0.5))
    assert "kl_target=0.5 has no effect with kl_controller='fixed'" in said
    _, said = _said(lambda: PPOConfig(str(tmp_path), use_cpu=True, kl_controller="fixed"))
    assert "has no effect" not in said


@pytest.mark.parametrize("name, beta, kwargs, match", [
    ("adaptive", 0.05, {"horizon": 0}, "horizon must be a finite number > 0"),  # ZeroDivisionError after iteration 1
    ("adaptive", 0.05, {"horizon": -10}, "horizon must be a finite number > 0"),  # β rose while KL was under target
    ("hard", 0.05, {"lr": -1.0}, "lr must be a finite number ≥ 0"),
    ("lagrangian", 0.05, {"lr": float("nan")}, "lr must be a finite number ≥ 0"),  # β silently 0 for good
    ("hard", 100.0, {}, r"above the hard controller's beta_max \(10\)"),  # β cut from 100 to 10 after iteration 1
    ("hard", 0.05, {"max_backtracks": -1}, "max_backtracks must be an integer ≥ 0"),
])
def test_controller_settings_that_would_misbehave_are_refused(name, beta, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_controller(name, beta, 4.0, **kwargs)


def test_controller_settings_at_their_edges_that_work():
    assert build_controller("hard", 100.0, 4.0, beta_max=100.0).beta == 100.0
    lag = build_controller("lagrangian", 0.0, 4.0, beta_max=0.0)
    assert lag.update(10.0) == 0.0
    assert build_controller("adaptive", 100.0, 4.0).beta == 100.0  # the adaptive controller has no cap
    uncapped = build_controller("hard", 0.05, 4.0, beta_max=float("inf"))  # inf: no cap, as before
    assert uncapped.update(1e6) > 10.0 and math.isfinite(uncapped.beta)
    with pytest.raises(ValueError, match="beta_max must be a finite number ≥ 0 \\(or inf: no cap\\)"):
        build_controller("hard", 0.05, 4.0, beta_max=float("nan"))


def test_backtrack_factor_is_said_to_have_no_effect():
    ctl, said = _said(lambda: build_controller("hard", 0.05, 4.0, backtrack_factor=0.3))
    assert "backtrack_factor=0.3 has no effect" in said and "bisection" in said
    _, said = _said(lambda: build_controller("hard", 0.05, 4.0))
    assert "backtrack_factor" not in said
    assert "backtrack_factor" not in ctl.state_dict()  # configuration, not state


def test_one_token_prompts_train_within_the_bound(tmp_path, tok):
    """Prompts of one token (a word, no BOS): the start-up check compared logits over zero states and crashed with
    torch's "max(): Expected reduction dim" before any training."""
    words = "hello thanks please yes no review write describe".split()
    data = Dataset.from_dict({"prompt": words * 2})
    tr = make(tmp_path, tok, data=data, per_device_train_batch_size=8, max_steps=2, kl_controller="hard",
              kl_target=0.2, learning_rate=0.1, max_completion_length=4)
    hist = tr.train()
    exact = exact_batch_kl(tr.policy.peft, tr.rollout, tr.args.temperature)
    assert exact <= 0.2 + 1e-6 and abs(hist[-1]["kl/after_update"] - exact) < 1e-6
    assert all(math.isfinite(h["loss/policy"]) for h in hist)


@pytest.mark.parametrize("epochs", [0, -1, float("nan")])
def test_no_epochs_and_no_max_steps_is_refused(tmp_path, epochs):
    """num_train_epochs=0 with max_steps unset ran one iteration (`max(1, …)`), which nobody asked for; it is the
    one setting that trains nothing, so it is refused with the two settings that do. max_steps still wins over it."""
    with pytest.raises(ValueError, match=r"trains no iteration: set num_train_epochs > 0 .* or max_steps ≥ 1"):
        PPOConfig(str(tmp_path), use_cpu=True, num_train_epochs=epochs)
    assert PPOConfig(str(tmp_path), use_cpu=True, num_train_epochs=epochs, max_steps=2).max_steps == 2
    assert PPOConfig(str(tmp_path), use_cpu=True, num_train_epochs=epochs, total_episodes=8).max_steps >= 1
