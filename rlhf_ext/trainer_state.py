"""transformers' `TrainerState` inside our own checkpoint folders: what `Trainer` writes as trainer_state.json (the log
history, epoch, best metric, the stateful callbacks' state — EarlyStoppingCallback's patience counter) and reads back
on resume. Both trainers write their checkpoints themselves (atomically, with a manifest), so both call these."""

from __future__ import annotations

from transformers.trainer_callback import ExportableState, TrainerState

TRAINER_STATE = "trainer_state.json"
RESTORED = ("log_history", "epoch", "best_metric", "best_global_step", "best_model_checkpoint", "stateful_callbacks",
            "total_flos")


def save_trainer_state(trainer, path) -> None:
    """trainer_state.json with the stateful callbacks' and TrainerControl's state, as `Trainer._save_checkpoint`."""
    for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
        name, state = cb.__class__.__name__, cb.state()
        if isinstance(trainer.state.stateful_callbacks.get(name), list):
            trainer.state.stateful_callbacks[name].append(state)
        else:
            trainer.state.stateful_callbacks[name] = state
    trainer.state.save_to_json(str(path))


def restore_trainer_state(trainer, path) -> None:
    """What a resumed run takes back from a saved trainer_state.json (the step counters are the trainer's own), and the
    callbacks' state (`restore_callback_states_from_checkpoint`, as transformers)."""
    saved = TrainerState.load_from_json(str(path))
    for name in RESTORED:
        setattr(trainer.state, name, getattr(saved, name))
    trainer._load_callback_state()
