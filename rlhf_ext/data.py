"""Dataset loading for recipes: hub ids, local folders of `<kind>_<split>.jsonl` files, or single files."""

from __future__ import annotations

from pathlib import Path

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
