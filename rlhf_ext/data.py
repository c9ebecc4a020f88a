"""Data helpers: loading splits for recipes (hub ids, folders of `<kind>_<split>.jsonl`, single files), padding
token-id lists, and the text of a plain or conversational field."""

from __future__ import annotations

import itertools
import json
import os
import warnings
from pathlib import Path

import torch



def shipped_dir() -> Path:
    """The shipped datasets: top-level `data/` in the repository, the package `rlhf_ext.datasets` when installed."""
    try:
        from . import datasets as shipped  # a wheel, or an editable install (package-dir mapping)

        return Path(shipped.__file__).resolve().parent
    except ImportError:
        return Path(__file__).resolve().parent.parent / "data"


SHIPPED = shipped_dir()


def resolve_data_path(name: str, config_file: str | None = None) -> str:
    """A dataset name from a recipe config: `shipped:<name>` (the package's data), a path relative to the current
    directory or, failing that, to the config file's folder, or a Hub id (returned unchanged)."""
    if name.startswith("shipped:"):
        return str(SHIPPED / name.split(":", 1)[1])
    if Path(name).expanduser().exists():  # `~/data`: as model_name_or_path and output_dir take it
        return str(Path(name).expanduser())
    if config_file is None:
        return name
    beside = Path(config_file).resolve().parent / name
    return str(beside) if beside.exists() else name


class DataFileError(ValueError):
    """A local JSON-lines file that cannot be read as rows: the message names the file, the line and the fix."""


def jsonl_rows(path) -> int:
    """The rows of a JSON-lines file, each line checked as `datasets` will read it: UTF-8 (a leading BOM allowed),
    one JSON object per line, blank lines skipped. A bad line is a `DataFileError` naming the file and line number —
    `datasets` reports them as "Expected object or value at position 18", a bare StopIteration (an empty file) or a
    UnicodeDecodeError only when a later step reads the text. One pass, one line in memory at a time."""
    rows = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as Windows editors write it
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(
                    f"{path} line {number}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line; "
                    f"a Latin-1 or Windows-1252 file?). Save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # the error's column, not the next line's start
            except ValueError as e:  # JSONDecodeError's own "line 1 column …" counts within the line
                where = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                raise DataFileError(f"{path} line {number}: not valid JSON ({where}). Each line must hold one JSON "
                                    f"object, e.g. {{\"prompt\": \"...\"}}.") from None
            if not isinstance(row, dict):
                kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(row), "a number or null")
                raise DataFileError(f"{path} line {number}: {kind}, not a JSON object. Each line must hold one JSON "
                                    f"object of columns, e.g. {{\"prompt\": \"...\"}}.")
            rows += 1
    return rows


def _load_jsonl(path: Path, streaming: bool):
    from datasets import load_dataset

    if path.suffix == ".jsonl" and not jsonl_rows(path):
        raise DataFileError(f"{path} holds no rows (it is empty or blank). Add rows, one JSON object per line, or "
                            f"point dataset_name at another dataset.")
    return load_dataset("json", data_files=str(path), split="train", streaming=streaming)


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # one file `load_split` reads as the train split


COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _data_suffix(path: Path) -> str | None:
    """The data format of a file name (`.jsonl`, `.json`, `.parquet`, `.csv`), also under a compression suffix
    (`rows.jsonl.gz`, which `datasets` reads as it is); None for anything else."""
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in DATA_FILE_SUFFIXES else None


def _checked_file(path: Path, suffix: str, streaming: bool):
    """A .json / .csv / .parquet file (or a compressed .jsonl) through `datasets`, its failures a `DataFileError`
    naming the file (`datasets` raised DatasetGenerationError or a bare StopIteration, a traceback), no rows one too,
    and chat messages a CSV can only hold as their Python text refused (they trained as that text)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    builder = {".jsonl": "json"}.get(suffix, suffix[1:])
    try:
        dataset = load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        first = next(iter(dataset), None)
    except (DatasetGenerationError, StopIteration, ValueError) as e:
        cause = e.__cause__ or e.__context__ or e
        why = " ".join(str(cause).split()) or "it holds no rows"
        raise DataFileError(f"{path} could not be read as {suffix[1:].upper()} ({type(cause).__name__}: {why}). "
                            f"Fix the file, or write it as JSON lines, one object per line.") from None
    if first is None:
        raise DataFileError(f"{path} holds no rows. Add rows, or point dataset_name at another dataset.")
    if suffix == ".json" and _columns_object(path, dataset, first, streaming):
        raise DataFileError(f"{path} is one JSON object of columns ({', '.join(first)}), which `datasets` reads as a "
                            f"single row. Write it as a JSON array of rows ([{{\"prompt\": ...}}, ...]) or as JSON "
                            f"lines.")
    if suffix == ".csv":
        for column, value in first.items():
            if isinstance(value, str) and value.lstrip().startswith(("[{'role'", '[{"role"', "[{'content'",
                                                                      '[{"content"')):
                raise DataFileError(f"{path}: column {column!r} holds chat messages written out as text ({value:.40}"
                                    f"...): a CSV cannot hold lists, and they would train as that text. Save the "
                                    f"data as JSON lines or parquet (Dataset.to_json / to_parquet).")
    return dataset


def _columns_object(path: Path, dataset, first: dict, streaming: bool) -> bool:
    """A .json file that is one object of equally long lists (columns), which `datasets` reads as one row — not an
    array of rows whose values are lists (pre-tokenised `input_ids`, `chosen_ids`), nor a genuine one-row file."""
    if path.suffix != ".json":  # compressed: not peeked at
        return False
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"{"):
        return False
    rows = len(list(itertools.islice(iter(dataset), 2))) if streaming else len(dataset)
    lengths = {len(v) if isinstance(v, list) else -1 for v in first.values()}
    return rows == 1 and len(lengths) == 1 and lengths.pop() >= 2 and not any(
        v and isinstance(v[0], dict) for v in first.values())


def _from_disk(path: Path, split: str):
    """A `Dataset.save_to_disk` folder (the 'train' split only, as one file is) or a `DatasetDict.save_to_disk` one."""
    from datasets import DatasetDict, load_from_disk

    saved = load_from_disk(str(path))
    if isinstance(saved, DatasetDict):
        if split not in saved:
            raise FileNotFoundError(f"{path} (a DatasetDict.save_to_disk folder) has no {split!r} split; it has "
                                    f"{sorted(saved)}. Set dataset_train_split / dataset_test_split to one of them.")
        return saved[split]
    if split != "train":
        raise FileNotFoundError(f"{path} is one saved Dataset, the 'train' split only: there is no {split!r} split in "
                                f"it. Save a DatasetDict of splits instead.")
    return saved


def _downloaded(path: Path, kind: str | None, split: str, streaming: bool):
    """A folder as `hf download --repo-type dataset` leaves it; `kind` (the recipes' `dataset_config`) names its
    config where its README declares configs, as it does for a Hub id."""
    from datasets import get_dataset_config_names, load_dataset

    name = kind if kind and kind in get_dataset_config_names(str(path)) else None
    return load_dataset(str(path), name, split=split, streaming=streaming)


def load_split(name_or_path: str, split: str, kind: str | None = None, streaming: bool = False):
    """Load one split. A folder is searched for `<kind>_<split>.jsonl`, then `<split>.jsonl`; a `.jsonl` file is
    checked line by line first (`jsonl_rows`: a bad line or an empty file is a `DataFileError` naming it). `streaming`
    (TRL's `dataset_streaming`): an `IterableDataset`, read as training goes instead of loaded whole first."""
    from datasets import load_dataset

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        for candidate in ([path / f"{kind}_{split}.jsonl"] if kind else []) + [path / f"{split}.jsonl"]:
            if candidate.is_file():
                return _load_jsonl(candidate, streaming)
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():  # save_to_disk
            return _from_disk(path, split)
        if any(path.glob(f"**/{split}[-.]*")) or any(path.glob(f"**/{split}/*")):  # a Hub download's layout
            return _downloaded(path, kind, split, streaming)  # data/train-00000-of-00001.parquet
        raise FileNotFoundError(
            f"No '{kind + '_' if kind else ''}{split}.jsonl' in {path}. Name the files <kind>_<split>.jsonl "
            f"(e.g. preferences_train.jsonl) or pass a Hub dataset id."
        )
    suffix = _data_suffix(path)
    if path.is_file() and suffix:
        if split != "train":  # one file is one split (as `datasets` has it): never the training rows again
            raise FileNotFoundError(f"{path} is one file, the 'train' split only: there is no {split!r} split in it. "
                                    f"Put the splits in a folder as <kind>_<split>.jsonl (e.g. prompts_test.jsonl).")
        if path.suffix == ".jsonl":
            return _load_jsonl(path, streaming)
        return _checked_file(path, suffix, streaming)
    from .models import is_hub_id

    if not is_hub_id(name_or_path) or suffix:  # a path, not an id
        raise FileNotFoundError(
            f"No dataset at {name_or_path!r}: no such folder or .jsonl / .json / .parquet / .csv file (relative paths "
            f"are read from {Path.cwd()}), and not a Hub id. Check the path, or pass a Hub id (namespace/name) or `shipped:sentiment`"
            f" (the package's own).")
    try:
        return load_dataset(name_or_path, kind, split=split, streaming=streaming)
    except (ConnectionError, FileNotFoundError) as e:  # offline / unreachable Hub, or no such dataset anywhere
        unreachable = isinstance(e, ConnectionError)
        raise (ConnectionError if unreachable else FileNotFoundError)(
            f"Could not load the dataset {name_or_path!r}: not a folder or .jsonl file here (relative paths are read "
            f"from {Path.cwd()}), and the Hub {'could not be reached' if unreachable else 'has no such dataset'} "
            f"({type(e).__name__}: {e}). Check the name or path; download a Hub dataset once while online (datasets "
            f"caches it), or save it as a local folder of <kind>_<split>.jsonl files (e.g. "
            f"{kind or 'preferences'}_{split}.jsonl) and pass that folder; `shipped:sentiment` is the package's own."
        ) from e


def pad_ids(seqs: list[list[int]], pad_id: int, side: str = "right", device=None):
    """Pad token-id lists to one tensor (TRL's `pad`); returns (ids, attention_mask), both [B, T] long."""
    from trl.trainer.utils import pad

    ids = pad([torch.tensor(s, dtype=torch.long) for s in seqs], padding_value=pad_id, padding_side=side)
    mask = pad([torch.ones(len(s), dtype=torch.long) for s in seqs], padding_value=0, padding_side=side)
    return ids.to(device), mask.to(device)


def model_pad_id(tokenizer, model) -> int:
    """The id padded positions hold when they reach `model`: the tokenizer's pad token when the embedding has it,
    else EOS, else 0. Padding is tracked by attention masks, never by id, so any in-range id is exact; a `[PAD]`
    added to the tokenizer without resizing the model (as TRL's PPO examples do) must not be embedded."""
    rows = model.get_input_embeddings().weight.shape[0]
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and 0 <= candidate < rows:
            return int(candidate)
    return 0


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The ids a response stops at: the tokenizer's EOS and every id of the model's `generation_config.eos_token_id`.
    Llama 3 Instruct and Gemma 2 it end an assistant turn with `<|eot_id|>` / `<end_of_turn>`, which their tokenizer's
    eos_token is not: stopping at the tokenizer's EOS alone ran every answer to the length cap, past the turn's end
    (TRL's GRPOTrainer merges the two alike). `model`: the model, or its folder / Hub id (its generation_config.json
    read, as TRL's trainers take a policy by name)."""
    ids = [] if getattr(tokenizer, "eos_token_id", None) is None else [tokenizer.eos_token_id]
    generation = getattr(model, "generation_config", None)
    if isinstance(model, (str, os.PathLike)):
        from transformers import GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(model)
        except OSError:  # none saved: the tokenizer's EOS alone, as transformers generates then
            generation = None
    configured = getattr(generation, "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [] if configured is None else [configured]
    return list(dict.fromkeys(int(i) for i in ids))


def leading_special_count(tokenizer) -> int:
    """How many special tokens the tokenizer puts before a text ([CLS], <s>, a BOS): kept when a text is cut from the
    left (`cut_from_left`; an encoder classifier pools its [CLS], a decoder never saw a text without its BOS)."""
    probe = "hello"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    for n in range(len(with_special) - len(plain) + 1):  # where the text starts ([UNK] is special too: look it up)
        if with_special[n : n + len(plain)] == plain:
            return n if all(i in special for i in with_special[:n]) else 0
    return 0


def cut_from_left(ids: list[int], limit: int, lead: int = 0) -> list[int]:
    """`ids` within `limit` tokens, cut from the left past its first `lead` (`leading_special_count`: the BOS or
    [CLS] stays first; at most limit - 1 of them)."""
    if len(ids) <= limit:
        return ids
    lead = min(lead, limit - 1)
    return ids[:lead] + ids[len(ids) - (limit - lead):]


def content_text(content) -> str:
    """A message's `content` as text: a string, None (an assistant turn that only calls tools), or a list of parts
    (`[{"type": "text", "text": ...}, {"type": "image"}]`, as newer chat templates and VLM datasets write it)."""
    if isinstance(content, list):
        return " ".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def chat_ids(tokenizer, messages: list, *, tools=None, template_kwargs: dict | None = None,
             generation_prompt: bool = False) -> list[int]:
    """`messages` rendered by the tokenizer's chat template as TRL's reward trainer renders them: with the row's
    `tools` column (a JSON string or a list, as TRL's datasets hold it) and the template's extra arguments
    (`chat_template_kwargs`) — one rule for the policy's prompts, the reward models' inputs and the prompt lengths."""
    extra = {"tools": json.loads(tools) if isinstance(tools, str) else tools} if tools is not None else {}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                         return_dict=True, **extra, **(template_kwargs or {}))["input_ids"]


def message_text(value) -> str:
    """The text of a plain string or of a list of chat messages (for emptiness checks): each message's content
    (`content_text`), and an assistant turn's tool calls (their function names), which are its response."""
    if not isinstance(value, list):
        return value
    if not all(isinstance(m, dict) for m in value):  # a list of strings: not a conversation
        return None
    return " ".join(content_text(m.get("content")) + " ".join(
        str((c.get("function") or c).get("name") or "") for c in (m.get("tool_calls") or []) if isinstance(c, dict))
        for m in value)


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "margin")
BASE = "the training set"  # how errors name `dataset` (a Dataset, not a file) beside the files


def _pair_kind(part) -> str:
    """"conversational" (lists of chat messages) or "text", from the first row's chosen response."""
    return "conversational" if isinstance(part[0]["chosen"], list) else "text"


def _as_implicit(part, name: str):
    """An explicit-prompt part (prompt + chosen/rejected completions) in TRL's implicit-prompt format, where chosen
    and rejected hold the whole exchange: the prompt put in front of each response — text joined as it is, chat
    messages as one list — exactly as TRL's reward trainer joins them itself before tokenising."""
    row = part[0]
    if isinstance(row["prompt"], list) != isinstance(row["chosen"], list):
        prompt = "conversational" if isinstance(row["prompt"], list) else "text"
        raise ValueError(f"extra_preferences: {name} has a {prompt} prompt but {_pair_kind(part)} responses, so its "
                         f"prompts cannot be joined to them to match the implicit-prompt format (no 'prompt' column) "
                         f"of the rest. Give its prompts and responses the same format.")
    return part.map(lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
                    remove_columns=["prompt"], keep_in_memory=name != BASE,  # a file's few rows; the base may be large
                    desc=f"extra_preferences: prompts into the responses of {name}")


def with_extra_preferences(dataset, files):
    """`dataset` plus the rows of each JSONL file in `files` (TRL preference format), on their shared columns
    (prompt/chosen/rejected[/margin]); extra columns such as provenance are dropped. A missing or empty file is an
    error naming it.

    TRL has two preference formats: explicit prompt (a 'prompt' column; chosen/rejected hold the responses, as the
    review page's preferences.jsonl) and implicit prompt (no 'prompt' column; chosen/rejected hold the whole exchange,
    as Anthropic/hh-rlhf). When the parts differ, the explicit ones are converted (`_as_implicit`): dropping their
    prompt column would train on bare responses. Text and conversational parts cannot be mixed: an error names
    which is which."""
    from datasets import concatenate_datasets, load_dataset

    if not files:
        return dataset
    from .monitor.queue import preferences_as_decided

    parts = [(BASE, dataset)]
    for f in files:
        preferences_as_decided(f)  # a review folder's preferences.jsonl a killed server left stale or missing: rebuilt
        if not Path(f).is_file():
            raise FileNotFoundError(f"extra_preferences: no file {f}. Decisions from the review page are in "
                                    f"OUTPUT_DIR/review/preferences.jsonl (written after the first decision).")
        if not jsonl_rows(f):  # `datasets` cannot even open an empty JSON file
            raise ValueError(f"extra_preferences: {f} holds no preference pairs yet.")
        extra = load_dataset("json", data_files=str(f), split="train")
        if len(extra) == 0:
            raise ValueError(f"extra_preferences: {f} holds no preference pairs yet.")
        parts.append((str(f), extra))
    for name, p in parts:
        missing = {"chosen", "rejected"} - set(p.column_names)
        if missing:
            raise ValueError(f"extra_preferences: {name} has no {sorted(missing)} column(s) (it has "
                             f"{sorted(p.column_names)}); TRL's preference format needs 'chosen' and 'rejected'.")
    kinds = {name: _pair_kind(p) for name, p in parts}
    if len(set(kinds.values())) > 1:
        which = "; ".join(f"{name} is {kind}" for name, kind in kinds.items())
        raise ValueError(f"extra_preferences mixes text and conversational (chat-message) preference pairs: {which}. "
                         f"One reward model trains on one format: convert the text rows to chat messages, or write "
                         f"the conversational ones out as text (e.g. with the tokenizer's chat template).")
    if not all("prompt" in p.column_names for _, p in parts):  # some implicit: every part in the implicit format
        parts = [(name, _as_implicit(p, name) if "prompt" in p.column_names else p) for name, p in parts]
    if any("margin" in p.column_names for _, p in parts):  # TRL's "no margin" is 0; dropping the column for all
        parts = [(name, p if "margin" in p.column_names  # (the review page writes none) lost every pair's margin
                  else p.add_column("margin", [0.0] * len(p))) for name, p in parts]
    cols = [c for c in PREFERENCE_COLUMNS if all(c in p.column_names for _, p in parts)]
    parts = [p.select_columns(cols) for _, p in parts]
    return concatenate_datasets([p.cast(parts[0].features) for p in parts])


def check_dataset_type(dataset, name: str = "train_dataset") -> None:
    """A trainer trains on one `datasets` split: a DatasetDict (`load_dataset(name)` without `split=`) or plain rows
    are refused with the line that makes one."""
    from datasets import Dataset, IterableDataset

    if isinstance(dataset, dict):
        split = "train" if "train" in dataset else sorted(dataset)[0]
        raise TypeError(f"`{name}` is a {type(dataset).__name__} of splits {sorted(dataset)}: pass one split, e.g. "
                        f"`{name}=dataset[{split!r}]` (or `load_dataset(..., split={split!r})`).")
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"`{name}` must be a `datasets.Dataset` or `IterableDataset`, got `{type(dataset).__name__}`. "
                        f"Make one with `Dataset.from_list(rows)` (a list of dicts) or `Dataset.from_dict(columns)` "
                        f"(a dict of lists).")


def held_in_memory(dataset):
    """A streamed evaluation set, read once into memory: each evaluation reads it whole (as transformers' Trainer reads
    an eval stream), and under DDP each process takes its share by index. Anything else as it is."""
    from datasets import Dataset, IterableDataset

    if not isinstance(dataset, IterableDataset):
        return dataset
    return Dataset.from_list(list(dataset), features=dataset.features)


PROGRESS_ROWS = 2000  # a prompt set at least this long is tokenized under a progress bar (seconds of work)
# the prompt itself, in either format; what the trainer produces (TRL's GRPO leaves these out of the reward kwargs too)
PROMPT_COLUMNS = ("prompt", "input_ids", "completion", "completion_ids")
# the keywords a reward function is called with besides the dataset's own columns: a column cannot take one's place
REWARD_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")


class PromptRow(tuple):
    """(prompt, token ids) — unpacked as that pair everywhere — with `columns`, the row's other dataset fields, which
    reward functions receive as keyword lists, as TRL's GRPO and RLOO pass them (e.g. a reference answer)."""

    columns: dict

    def __new__(cls, prompt, ids, columns: dict | None = None):
        row = super().__new__(cls, (prompt, ids))
        row.columns = columns or {}
        return row


def _prompt_text(tokenizer, ids) -> str:
    """A token-id prompt as the text the reward functions and reward models get: decoded without its leading BOS,
    which tokenizing the text again (`reward_input_ids`, as TRL's reward trainer tokenizes) adds back — kept, the
    reward model saw two."""
    ids = list(ids)
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return tokenizer.decode(ids)


def drop_early_turns(messages: list, render, limit: int) -> tuple[list, list[int]]:
    """A conversation within `limit` tokens by dropping its earliest turns: the leading system message(s) kept and the
    rest starting at a user turn (templates that require alternation refuse anything else). `render`: messages → the
    prompt's token ids. Returns (messages, ids): the longest that fits, else the shortest such (its last user turn on),
    which the caller cuts further."""
    head = list(itertools.takewhile(lambda m: m.get("role") == "system", messages))
    rest = messages[len(head):]
    kept, ids = messages, render(messages)
    for j in [j for j, m in enumerate(rest) if j and m.get("role") == "user"]:
        kept, ids = head + rest[j:], render(head + rest[j:])
        if len(ids) <= limit:
            break
    return kept, ids


def tokenize_prompts(dataset, tokenizer, args, min_rows: int | None = None, desc: str = "Tokenizing prompts",
                     limit: int | None = None):
    """TRL prompt-only data (text or conversational) → list of (prompt, token ids), chat template applied as TRL
    does. `args` supplies max_prompt_length, prompt_overflow and per_device_train_batch_size (a PPOConfig) and, for
    the progress bar a large or streamed set gets, disable_tqdm and process_index. Bad rows raise or drop. `limit`:
    stop after that many usable prompts (a stream is read no further)."""
    from tqdm.auto import tqdm

    from .progress import bars_off

    columns = dataset.column_names
    if columns is None:  # a stream whose features are not declared (a generator's): its first row has them
        columns = list(next(iter(dataset), {}))
    if not columns:  # an empty stream (held in memory: an evaluation set), which declared no columns either
        what = "train_dataset" if min_rows is None else "The evaluation set"
        raise ValueError(f"{what} is empty (the stream yields no rows): add prompts.")
    if "prompt" not in columns and "input_ids" not in columns:
        raise ValueError(f"The PPO dataset needs a 'prompt' column (TRL prompt-only format), or 'input_ids' as TRL "
                         f"1.12's PPO took it; it has {columns}.")
    extra = [c for c in columns if c not in PROMPT_COLUMNS]
    clash = sorted(set(extra) & set(REWARD_KEYWORDS))
    if clash:
        raise ValueError(f"Dataset column(s) {clash} would take the place of the reward functions' own argument(s) of "
                         f"that name (they receive every other column as a keyword). Rename the column(s).")
    if "prompt" in columns:
        source = ((i, r["prompt"], None, r) for i, r in enumerate(dataset))
    else:  # TRL 1.12 PPO's format: token ids; the rewards get the decoded text
        source = ((i, _prompt_text(tokenizer, r["input_ids"]), list(r["input_ids"]), r) for i, r in enumerate(dataset))
    total = len(dataset) if hasattr(dataset, "__len__") else limit  # a streamed set: length unknown
    quiet = bars_off(args) or (total is not None and total < PROGRESS_ROWS)
    rows, too_long, cut, lead = [], [], [], None
    for i, prompt, ids, row in tqdm(source, total=total, desc=desc, unit="prompt", disable=quiet, leave=False):
        text = message_text(prompt)
        if not isinstance(text, str):
            raise ValueError(f"Prompt {i} is a {type(prompt).__name__} ({prompt!r:.60}), not text: a prompt is a string "
                             f"or a list of chat messages.")
        if not text.strip():
            raise ValueError(f"Prompt {i} is empty. Remove empty prompts from the dataset.")
        if ids is None and isinstance(prompt, list) and getattr(tokenizer, "chat_template", "") is None:
            raise ValueError(f"Prompt {i} is a list of chat messages but the tokenizer has no chat template (a base "
                             f"model's tokenizer). Set tokenizer.chat_template (or pass a chat model's tokenizer), or "
                             f"give the prompts as text.")
        render = None
        if ids is None and isinstance(prompt, list):
            render = lambda messages: chat_ids(  # noqa: E731
                tokenizer, messages, tools=row.get("tools"), template_kwargs=getattr(args, "chat_template_kwargs", None),
                generation_prompt=True)
            ids = render(prompt)
        elif ids is None:
            ids = tokenizer(text=prompt)["input_ids"]
        if len(ids) > args.max_prompt_length:
            too_long.append((i, len(ids)))
            if args.prompt_overflow == "drop":
                continue
            if args.prompt_overflow == "truncate" and render is not None:
                # a conversation loses whole early turns, its system message kept: the prompt the reward models
                # judge against is then the one the policy saw (a token cut would leave them the whole history)
                prompt, ids = drop_early_turns(prompt, render, args.max_prompt_length)
            if args.prompt_overflow == "truncate" and len(ids) > args.max_prompt_length:  # its start cut, BOS kept
                if lead is None:
                    lead = leading_special_count(tokenizer)
                ids = cut_from_left(list(ids), args.max_prompt_length, lead)
                cut.append(i)
        rows.append(PromptRow(prompt, list(ids), {c: row[c] for c in extra}))
        if limit is not None and len(rows) == limit:
            break
    if too_long:
        msg = (f"{len(too_long)} prompt(s) exceed max_prompt_length={args.max_prompt_length} tokens (first: row "
               f"{too_long[0][0]} with {too_long[0][1]} tokens).")
        if args.prompt_overflow == "error":
            raise ValueError(msg + " Raise `max_prompt_length`, or set `prompt_overflow` to 'drop' or 'truncate'.")
        turns = len(too_long) - len(cut)
        warnings.warn(msg + f" prompt_overflow={args.prompt_overflow!r}: they were {args.prompt_overflow}ped."
                      if args.prompt_overflow == "drop" else msg + " They were truncated: "
                      + "; ".join(filter(None, [
                          turns and f"{turns} conversation(s) by their earliest turns (the system message kept)",
                          cut and f"{len(cut)} to their last tokens (for these the reward models still judge the "
                                  f"whole prompt)"])) + ".")
    # a training set fills one global batch: each process draws its own per_device_train_batch_size of it
    world = max(1, int(getattr(args, "world_size", 1) or 1)) if min_rows is None else 1
    need = args.per_device_train_batch_size * world if min_rows is None else min_rows
    if len(rows) < need:
        dropped = f" ({len(too_long)} dropped as longer than max_prompt_length)" if args.prompt_overflow == "drop" \
            and too_long else ""
        fix = ("add prompts or lower per_device_train_batch_size" + (" or run fewer processes" if world > 1 else "")
               if min_rows is None else "add prompts")
        batch = (f"a global batch of {need} (per_device_train_batch_size={args.per_device_train_batch_size} × "
                 f"{world} processes)" if world > 1 else f"a batch of {need}")
        raise ValueError(f"Only {len(rows)} usable prompts{dropped} for {batch}: {fix}"
                         + (", or raise max_prompt_length" if dropped else "") + ".")
    return rows
