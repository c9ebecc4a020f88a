"""A KL controller driving the β of TRL's own online trainers (GRPOTrainer, RLOOTrainer) from a callback.

Its own module so that the controllers in `kl.py` (and `rlhf-ext plugins`) do not import transformers' Trainer.
"""

from __future__ import annotations

import math
import warnings

from transformers import TrainerCallback

from ..trainer_state import claim_checkpoint_key, save_with_checkpoint, saved_with_checkpoint
from .contract import checked_beta
from .kl import KLController


# ------------------------------------------------------------------------------------------------ the callback
class KLControllerCallback(TrainerCallback):
    """Drive `trainer.beta` of TRL's GRPOTrainer / RLOOTrainer with any KL controller.

        trainer.add_callback(KLControllerCallback(controller, trainer))

    The trainer must be given (β lives on it), so add the callback after building the trainer rather than in
    `callbacks=[...]`; and the config's `beta` must be > 0, or TRL loads no reference and never computes the KL.

    At train start β becomes the controller's. The controller then sees the logged `kl` (TRL logs a per-token mean,
    so set the controller target in those units) once per *logging step* — `logging_steps` sets its cadence — with
    `n_steps` the number of completions generated since its last update (the adaptive controller's horizon is in
    samples, as in PPOTrainer), and writes the new β back. β is kept ≥ `min_beta` > 0 because TRL skips the
    reference pass entirely when β == 0. The controller's state is saved with TRL's checkpoints and restored on
    `resume_from_checkpoint`.
    """

    STATE_KEY = "rlhf_ext.KLControllerCallback"

    def __init__(self, controller: KLController, trainer=None, min_beta: float = 1e-6):
        if not min_beta > 0:
            raise ValueError(f"min_beta must be > 0 (at β = 0 TRL stops computing the KL the controller reads), got "
                             f"{min_beta}.")
        self.controller, self.trainer, self.min_beta = controller, trainer, min_beta
        self._completions_per_step = None  # set in on_train_begin; None when driven by hand: one step per update
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._check_setup(args)
        claim_checkpoint_key(state, self.STATE_KEY, "Two KLControllerCallbacks drive one trainer's β, each undoing "
                                                    "the other's updates: add only one.")
        self._restore(state)
        self._completions_per_step = completions_per_optimizer_step(args)
        self._last_step = state.global_step
        # first in line for `on_log`: added after the trainer was built, it came after the loggers (report_to, the
        # console), which had already sent `logs` on without kl_controller/beta. A slice assignment: the handler is
        # iterating this very list, and the callbacks after this one still come next
        callbacks = self.trainer.callback_handler.callbacks
        callbacks[:] = [self, *(c for c in callbacks if c is not self)]
        # else the steps before the first log would use args.beta, and a resumed run the configured β
        self.trainer.beta = max(self.controller.beta, self.min_beta)
        save_with_checkpoint(state, self.STATE_KEY, self.controller.state_dict())

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = (logs or {}).get("kl")
        # TRL logs None for a window whose KL values were all NaN; a NaN fed to a controller would leave β NaN for good
        if self.trainer is None or kl is None or not math.isfinite(float(kl)):
            return
        self.controller.update(float(kl), n_steps=self._completions_since_update(state))
        beta = max(checked_beta(self.controller), self.min_beta)
        self.trainer.beta = beta
        logs["kl_controller/beta"] = beta
        if state.log_history:  # Trainer appended a copy of `logs` before calling us
            state.log_history[-1]["kl_controller/beta"] = beta
        save_with_checkpoint(state, self.STATE_KEY, self.controller.state_dict())

    def _check_setup(self, args) -> None:
        """Refuse the set-ups in which the callback would silently leave β alone."""
        if self.trainer is None:
            raise ValueError(
                "KLControllerCallback has no trainer, so it cannot set β (it lives on the trainer). A callback passed "
                "in `callbacks=[...]` is built before the trainer exists: build the trainer first, then "
                "`trainer.add_callback(KLControllerCallback(controller, trainer))`.")
        if not hasattr(self.trainer, "beta") or getattr(args, "beta", None) is None:
            raise ValueError(f"KLControllerCallback drives `beta` of TRL's GRPOTrainer / RLOOTrainer; "
                             f"{type(self.trainer).__name__} has none. For PPOTrainer, set `kl_controller` in "
                             f"PPOConfig.")
        if args.beta == 0:
            raise ValueError(
                f"The config's beta is 0: TRL then builds no reference model and never computes "
                f"the KL, so the controller would never run. Set `beta` > 0 in the config (e.g. the controller's "
                f"initial β, {self.controller.beta:g}); the callback replaces it with the controller's β at train "
                f"start.")

    def _restore(self, state) -> None:
        """On a resume, continue the controller from the checkpoint instead of restarting its β."""
        saved = saved_with_checkpoint(state, self.STATE_KEY)
        if saved is not None:
            self.controller.load_state_dict(saved)
        elif state.global_step > 0:
            warnings.warn(f"Resuming at step {state.global_step} from a checkpoint without KL controller state (saved "
                          f"without KLControllerCallback, or by an older rlhf_ext): β restarts at the controller's "
                          f"{self.controller.beta:g}.", UserWarning, stacklevel=2)

    def _completions_since_update(self, state) -> float:
        """Completions generated since the controller's last update: its `n_steps` (1 when driven by hand)."""
        if self._completions_per_step is None:
            return 1
        steps, self._last_step = state.global_step - self._last_step, state.global_step
        return steps * self._completions_per_step


def completions_per_optimizer_step(args) -> float:
    """New completions TRL's GRPO / RLOO generate per optimizer step, over every process: each step trains on
    per_device_train_batch_size × gradient_accumulation_steps × world_size completions (however
    `steps_per_generation` / `generation_batch_size` chunk their generation), each reused `num_iterations` times."""
    trained = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return trained / getattr(args, "num_iterations", 1)
