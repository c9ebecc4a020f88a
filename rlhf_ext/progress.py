"""Progress bars for long work inside a trainer: shown on the main process only (N processes would draw N bars over
each other) and never when the trainer's arguments say `disable_tqdm`."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(trainer, iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, off where `trainer` (a `transformers.Trainer`) shows no bars."""
    return tqdm(iterable, disable=trainer.args.disable_tqdm or not trainer.is_world_process_zero(), **kwargs)
