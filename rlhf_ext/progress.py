"""Progress bars for long work inside a trainer: shown on the main process only (N processes would draw N bars over
each other) and never when the trainer's arguments say `disable_tqdm`."""

from __future__ import annotations

from tqdm.auto import tqdm


def bars_off(args) -> bool:
    """Before a trainer exists: whether its arguments (a `TrainingArguments`, or anything with its fields) say no bars
    — `disable_tqdm`, or not the main process (`process_index`, what `Trainer.is_world_process_zero` reads)."""
    return bool(getattr(args, "disable_tqdm", False)) or getattr(args, "process_index", 0) != 0


def progress(trainer, iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, off where `trainer` (a `transformers.Trainer`) shows no bars."""
    return tqdm(iterable, disable=trainer.args.disable_tqdm or not trainer.is_world_process_zero(), **kwargs)
