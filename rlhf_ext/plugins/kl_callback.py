"""A KL controller driving the β of TRL's own online trainers (GRPOTrainer, RLOOTrainer) from a callback.

Its own module so that the controllers in `kl.py` (and `rlhf-ext plugins`) do not import transformers' Trainer.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from .kl import KLController


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
        if not math.isfinite(float(logs["kl"])):  # a NaN fed to a controller would leave β NaN for good
            return
        beta = max(self.controller.update(float(logs["kl"]), n_steps=1), self.min_beta)
        self.trainer.beta = beta
        logs["kl_controller/beta"] = beta
        if state.log_history:  # Trainer appended a copy of `logs` before calling us
            state.log_history[-1]["kl_controller/beta"] = beta
