"""What train() returns: the iterations' metrics with `TrainOutput`'s fields beside them. (When it logs, evaluates and
saves is transformers' own DefaultFlowCallback's decision, one PPO iteration as the step: `PPOTrainer.train`.)"""

from __future__ import annotations

import math


class TrainHistory(list):
    """What `PPOTrainer.train()` returns: every iteration's metrics, in order (a list), with the fields of
    transformers' `TrainOutput` beside them — `global_step`, `training_loss` (the mean PPO objective,
    policy loss + vf_coef · value loss, over the iterations) and `metrics` (train_runtime, train_samples_per_second,
    train_steps_per_second, train_loss, epoch; samples are prompts) — so a script written for `Trainer`
    (`trainer.log_metrics("train", trainer.train().metrics)`) runs unchanged."""

    def __init__(self, history: list[dict], global_step: int, vf_coef: float, seconds: float, prompts: int,
                 iterations: int, epoch: float | None, nan_inf_filter: bool = True):
        super().__init__(history)
        losses = [h["loss/policy"] + vf_coef * h["loss/value"] for h in history if "loss/policy" in h]
        if nan_inf_filter:  # Trainer's logging_nan_inf_filter (default True): a NaN/inf loss is left out of the mean
            losses = [x for x in losses if math.isfinite(x)]  # (an iteration that took no step: every sample dropped)
        self.global_step = global_step
        self.training_loss = sum(losses) / len(losses) if losses else float("nan")
        self.metrics = {"train_runtime": round(seconds, 4),
                        "train_samples_per_second": round(prompts / seconds, 3) if seconds > 0 else 0.0,
                        "train_steps_per_second": round(iterations / seconds, 3) if seconds > 0 else 0.0,
                        "train_loss": self.training_loss, "epoch": epoch}
