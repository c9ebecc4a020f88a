"""What the trainers check of a plugin's work. A plugin is user code: an output of the wrong shape broadcasts, an
in-place edit changes a tensor PPO reads afterwards, a β below zero pays for KL, a state that is not JSON fails at
the first checkpoint hours into a run — each far from the plugin that caused it. These checks name the plugin and
the fix instead."""

from __future__ import annotations

import json
import math

import torch


def checked_output(out, like: torch.Tensor, point: str, name: str, returns: str) -> torch.Tensor:
    """A plugin's result where a float tensor of `like`'s shape is due, detached. `returns`: what it stands for.
    A list, another shape (which would broadcast) or an integer tensor → ValueError naming the plugin."""
    if torch.is_tensor(out) and out.shape == like.shape and out.is_floating_point():
        return out.detach()
    got = f"a {out.dtype} tensor of shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
    raise ValueError(f"The {point} plugin {name!r} returned {got}; it must return a float tensor of shape "
                     f"{tuple(like.shape)}: {returns}.")


def checked_beta(controller) -> float:
    """β after a controller's `update()`: a finite number ≥ 0 (a negative β rewards KL, a NaN one skips every step
    after it)."""
    beta = controller.beta
    if isinstance(beta, torch.Tensor) and beta.numel() == 1:
        beta = controller.beta = float(beta)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"The kl_controller {controller.name!r} set β = {beta!r}: β must be a finite number ≥ 0 (a "
                         f"negative β pays for KL, a NaN one stops training). Clamp it in the controller's update().")
    return float(beta)


def check_state_saves(plugin, point: str, name: str) -> None:
    """A plugin's `state_dict()` goes into every checkpoint as JSON: one that cannot be written fails at the start
    of the run, not at its first save."""
    try:
        json.dumps(plugin.state_dict(), allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"The {point} plugin {name!r} has a state_dict() a checkpoint cannot hold ({e}): return "
                         f"numbers, strings, None, lists and dicts (JSON), and rebuild richer objects in "
                         f"load_state_dict().") from None
