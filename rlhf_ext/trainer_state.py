"""transformers' `TrainerState` in checkpoints: what `Trainer` writes as trainer_state.json (the log history, epoch,
best metric, the stateful callbacks' state — EarlyStoppingCallback's patience counter) and reads back on resume. Both
our trainers write their checkpoints themselves (atomically, with a manifest), so both call `save_trainer_state` /
`restore_trainer_state`; our callbacks inside TRL's trainers keep their own state there (`save_with_checkpoint`)."""

from __future__ import annotations

import json

from transformers.trainer_callback import ExportableState, TrainerState

TRAINER_STATE = "trainer_state.json"
RESTORED = ("log_history", "epoch", "best_metric", "best_global_step", "best_model_checkpoint", "stateful_callbacks",
            "total_flos", "num_input_tokens_seen")


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


# ------------------------------------------------------------------------------------- state in TRL checkpoints
# transformers writes `state.stateful_callbacks` into every checkpoint's trainer_state.json and reads it back on a
# resume, before `on_train_begin`. Its own restore (`ExportableState`, opt-in) rebuilds a callback from saved
# constructor arguments, which cannot hold a controller, a pipeline or a trainer; so our callbacks keep their state
# there under keys that are no class name (that restore skips them, logging that it ignores them) and restore it
# themselves in on_train_begin.
def save_with_checkpoint(state, key: str, value: dict) -> None:
    """Keep `value` in `state.stateful_callbacks[key]`, so the next checkpoint's trainer_state.json holds it."""
    store = getattr(state, "stateful_callbacks", None)
    if store is None:  # a callback driven by hand with a bare state: nothing is checkpointed
        return
    store[key] = json.loads(json.dumps(value, default=_plain))  # fails now, naming the value, not at the save


def saved_with_checkpoint(state, key: str) -> dict | None:
    """What `save_with_checkpoint` kept under `key` in the checkpoint this run resumed from (None if nothing)."""
    return (getattr(state, "stateful_callbacks", None) or {}).get(key)


def claim_checkpoint_key(state, key: str, clash: str) -> None:
    """Refuse a second callback keeping its state under `key` in this run (`clash`: what is wrong, how to fix it):
    each would restore the other's state, and the checkpoint would hold only the last one written."""
    claimed = vars(state).setdefault("_rlhf_ext_claimed_keys", set())  # an attribute, not a field: never saved
    if key in claimed:
        raise ValueError(clash)
    claimed.add(key)


def _plain(value):
    """JSON for the numbers a state may hold as tensors or NumPy scalars; anything else is refused by name."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"A state saved with TRL checkpoints must be JSON (numbers, strings, lists, dicts); it holds a "
                    f"{type(value).__name__}. Return plain numbers from the part's state_dict().")
