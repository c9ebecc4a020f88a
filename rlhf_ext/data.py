"""Data helpers: loading splits for recipes (hub ids, folders of `<kind>_<split>.jsonl`, single files), padding
token-id lists, and the text of a plain or conversational field."""

from __future__ import annotations

from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parent.parent / "data"


def load_split(name_or_path: str, split: str, kind: str | None = None):
    """Load one split. A folder is searched for `<kind>_<split>.jsonl`, then `<split>.jsonl`."""
    from datasets import load_dataset

    path = Path(name_or_path)
    if path.is_dir():
        for candidate in ([path / f"{kind}_{split}.jsonl"] if kind else []) + [path / f"{split}.jsonl"]:
            if candidate.is_file():
                return load_dataset("json", data_files=str(candidate), split="train")
        raise FileNotFoundError(
            f"No '{kind + '_' if kind else ''}{split}.jsonl' in {path}. Name the files <kind>_<split>.jsonl "
            f"(e.g. preferences_train.jsonl) or pass a Hub dataset id."
        )
    if path.suffix in (".jsonl", ".json") and path.is_file():
        return load_dataset("json", data_files=str(path), split="train")
    return load_dataset(name_or_path, kind, split=split)


def pad_ids(seqs: list[list[int]], pad_id: int, side: str = "right", device=None):
    """Pad token-id lists to one tensor (TRL's `pad`); returns (ids, attention_mask), both [B, T] long."""
    from trl.trainer.utils import pad

    ids = pad([torch.tensor(s, dtype=torch.long) for s in seqs], padding_value=pad_id, padding_side=side)
    mask = pad([torch.ones(len(s), dtype=torch.long) for s in seqs], padding_value=0, padding_side=side)
    return ids.to(device), mask.to(device)


def message_text(value) -> str:
    """The text of a plain string or of a list of chat messages (for emptiness checks)."""
    return " ".join(m.get("content") or "" for m in value) if isinstance(value, list) else value
