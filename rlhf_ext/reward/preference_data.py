"""The reward trainer's data: preference rows checked before TRL tokenises them (errors name the row and the fix),
reviewed pairs added from `extra_preferences`, the `max_length` check, and what the ensemble's loss needs beside TRL's
batch — per-pair bootstrap weights and response lengths."""

from __future__ import annotations

import bisect
import hashlib
import math
import warnings
from dataclasses import dataclass
from itertools import accumulate, islice

import torch
from datasets import Dataset, IterableDataset
from trl.data_utils import get_dataset_column_names
from trl.trainer.reward_trainer import DataCollatorForPreference

from ..data import chat_ids, check_dataset_type, message_text

_TOKENISED = ({"chosen_ids", "rejected_ids"}, {"chosen_input_ids", "rejected_input_ids"})  # TRL's, and its legacy names
_STREAM_PEEK = 64  # rows of a streaming dataset read at start-up for the length check


def _check_text(value, name: str, i: int, col: str, reviewed: bool = False) -> None:
    """A preference field must be text or a list of chat messages; chosen/rejected must not be blank."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(m, dict) for m in value):
        text = message_text(value)
    else:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{name} row {i}: '{col}' is a {type(value).__name__} ({shown}), not text. TRL's preference "
                         f"format needs a string, or a list of chat messages ({{'role': ..., 'content': ...}}); convert "
                         f"the column or drop the row.")
    # a blank *rejected* response is a real preference (an empty or whitespace answer is worse), as a review of the
    # monitor's pairs records it when the policy or the reference stops at once; TRL trains on it. A blank chosen
    # one is far more often a broken column — except in a pair a person decided (extra_preferences: "an empty answer
    # beats this one" is a decision the review page records, and one such row stopped the whole retrain).
    if col == "chosen" and not reviewed and not text.strip():
        raise ValueError(f"{name} row {i}: '{col}' is empty. Remove the row or fill in the response.")


def _check_row(row: dict, i: int, name: str) -> None:
    for col in ("prompt", "chosen", "rejected"):
        if col in row:
            _check_text(row[col], name, i, col, reviewed=bool(row.get(EXTRA_MARK)))
    forms = {col: {type(m.get("content")).__name__ for m in row[col] if m.get("content") is not None}
             for col in ("prompt", "chosen", "rejected") if isinstance(row.get(col), list)}
    if {"str", "list"} <= set().union(*forms.values()):
        raise ValueError(f"{name} row {i}: its messages mix text content and lists of content parts ("
                         f"{', '.join(f'{c}: {sorted(f)}' for c, f in forms.items())}). Give every message's content "
                         f"in one form: TRL joins prompt and response into one column, which cannot hold both.")
    prompt = row.get("prompt")
    if prompt is not None and _form(prompt) != _form(row["chosen"]):
        raise ValueError(f"{name} row {i}: 'prompt' is {_form(prompt)} but 'chosen' is {_form(row['chosen'])}: TRL "
                         f"joins the prompt to each response, which needs one format. If chosen/rejected already hold "
                         f"the whole conversation (as in HuggingFaceH4/ultrafeedback_binarized), drop the prompt "
                         f"column: `dataset.remove_columns('prompt')`.")
    if "margin" in row:
        m = row["margin"]
        if m is None or isinstance(m, (str, bytes)) or not math.isfinite(float(m)):
            raise ValueError(f"{name} row {i}: margin {m!r} is not a finite number. Fix or drop the row.")


def _form(value) -> str:
    """A preference column's format, as the errors name it."""
    return "a list of chat messages" if isinstance(value, list) else "text"


def validate_preference_dataset(dataset, name: str = "train_dataset"):
    """Fail early, naming the row and the fix, instead of deep inside tokenisation. Pairs whose chosen and
    rejected responses are identical carry no preference (the loss is log 2 whatever the model does): they are
    dropped with a counted warning. Returns the dataset to train on.

    A streaming `IterableDataset` is checked as it is read: its first row at once, every row when it streams by
    (a bad row stops training naming its index), ties dropped with a warning at the first one (they cannot be
    counted in advance)."""
    check_dataset_type(dataset, name)
    if dataset.column_names is None and next(iter(dataset), None) is None:  # a generator's stream: no declared
        raise ValueError(f"{name} is empty (the stream yields no rows).")  # features (TRL: a bare StopIteration)
    cols = set(get_dataset_column_names(dataset))
    if any(pair <= cols for pair in _TOKENISED):  # pre-tokenised: TRL renames the legacy columns (FutureWarning)
        return dataset
    missing = {"chosen", "rejected"} - cols
    if missing:
        raise ValueError(
            f"{name} is missing column(s) {sorted(missing)}; it has {sorted(cols)}. Reward modelling needs TRL's "
            f"preference format: 'chosen' and 'rejected' (and optionally 'prompt', 'margin'), or pre-tokenised "
            f"'chosen_ids' and 'rejected_ids'." + (
                " Its input_ids_chosen / input_ids_rejected columns are an older TRL version's tokenised format: "
                "rename them, `dataset.rename_columns({'input_ids_chosen': 'chosen_ids', 'input_ids_rejected': "
                "'rejected_ids'})` (the attention masks are not needed)."
                if {"input_ids_chosen", "input_ids_rejected"} <= cols else "")
        )
    if isinstance(dataset, IterableDataset):
        return _validate_streaming(dataset, name)
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")
    ties, kinds = [], {}
    for i, row in enumerate(dataset):
        _check_row(row, i, name)
        for col in ("prompt", "chosen", "rejected"):  # one format per column: TRL's own steps fail on a mix
            if col in row:
                kind = _form(row[col])
                first = kinds.setdefault(col, (kind, i))
                if first[0] != kind:
                    raise ValueError(f"{name} row {i}: '{col}' is {kind}, but row {first[1]}'s is {first[0]}. Give "
                                     f"every row the same format (all text, or all chat messages).")
        if row["chosen"] == row["rejected"]:
            ties.append(i)
    return _drop_ties(dataset, ties, name, "has chosen == rejected", "are identical")


def _drop_ties(dataset, ties: list[int], name: str, every: str, alike: str, why: str = ""):
    """`dataset` without the pairs `ties` (rows whose chosen and rejected carry no preference: the loss is log 2
    whatever the model does), with a count; all of them is an error."""
    if not ties:
        return dataset
    if len(ties) == len(dataset):
        raise ValueError(f"Every pair of {name} {every}: there is no preference to learn.")
    warnings.warn(f"{name}: dropped {len(ties)} pair(s) whose chosen and rejected responses {alike} (first: row "
                  f"{ties[0]}{why}); they carry no preference.", stacklevel=4)
    return dataset.select(sorted(set(range(len(dataset))) - set(ties)))


def drop_token_ties(dataset, name: str):
    """Pairs whose chosen and rejected token ids are the same — they differ only in what the chat template does not
    render (a message's `reasoning_content` or `name`, text a template strips) — carry no preference either: dropped
    with a count, as identical text is (a stream: as it streams)."""
    if isinstance(dataset, IterableDataset):
        return dataset.filter(lambda e: e["chosen_ids"] != e["rejected_ids"])
    ties, seen = [], 0
    for batch in dataset.select_columns(["chosen_ids", "rejected_ids"]).iter(batch_size=1024):
        ties += [seen + i for i, (c, r) in enumerate(zip(batch["chosen_ids"], batch["rejected_ids"])) if c == r]
        seen += len(batch["chosen_ids"])
    return _drop_ties(dataset, ties, name, "tokenizes to the same chosen and rejected ids (they differ only in what "
                      "the chat template does not render)", "tokenize alike", "; they differ only in what the chat "
                      "template does not render, such as a reasoning_content or a message name")


def _validate_streaming(dataset: IterableDataset, name: str) -> IterableDataset:
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"{name} is empty.")
    _check_row(first, 0, name)
    warned = []

    def check(row, i):
        _check_row(row, i, name)
        return row

    def not_a_tie(row, i):
        if row["chosen"] != row["rejected"]:
            return True
        if not warned:
            warned.append(i)
            warnings.warn(f"{name}: dropping pairs whose chosen and rejected responses are identical as they stream "
                          f"by (first: row {i}); they carry no preference. A streaming dataset cannot count them in "
                          f"advance.", stacklevel=2)
        return False

    checked = dataset.map(check, with_indices=True).filter(not_a_tie, with_indices=True)
    # a first pair that is a tie: read on to the first that is not (the trainer reads it next; a stream of nothing but
    # ties ended there in a bare StopIteration)
    if first["chosen"] == first["rejected"] and next(iter(checked), None) is None:
        raise ValueError(f"Every pair of {name} has chosen == rejected: there is no preference to learn.")
    return checked


def add_extra_preferences(train_dataset, files, weight: int = 1):
    """`RewardEnsembleConfig.extra_preferences` applied to the training set, each extra row `weight` times (a missing
    or empty file is an error naming it). A training set that already ends with exactly those rows (a script that
    called `rlhf_ext.data.with_extra_preferences` itself, as the recipe once did) is used as it is, with a warning.
    A review folder's preferences.jsonl is first made to agree with its decisions.jsonl (in `with_extra_preferences`)."""
    from ..data import with_extra_preferences

    if isinstance(train_dataset, IterableDataset):
        raise ValueError("extra_preferences needs a sized train_dataset (a datasets.Dataset): a streaming "
                         "IterableDataset cannot be concatenated with the preference files. Load the stream into a "
                         "Dataset, or add the files' rows to the stream yourself and leave extra_preferences unset.")
    combined = with_extra_preferences(train_dataset, files)
    n = len(combined) - len(train_dataset)
    if 0 < n <= len(train_dataset):
        cols = [c for c in ("prompt", "chosen", "rejected") if c in combined.column_names]
        tail = train_dataset.select(range(len(train_dataset) - n, len(train_dataset))).select_columns(cols)
        if tail.to_list() == combined.select(range(len(train_dataset), len(combined))).select_columns(cols).to_list():
            warnings.warn(f"extra_preferences: train_dataset already ends with the {n} pair(s) of {list(files)} (added "
                          f"by rlhf_ext.data.with_extra_preferences); they are not added a second time.", stacklevel=3)
            return train_dataset
    if weight > 1:
        from datasets import concatenate_datasets

        extra = combined.select(range(len(train_dataset), len(combined)))
        combined = concatenate_datasets([combined] + [extra] * (weight - 1))
    # which rows are reviewed pairs, for the max_length filter's count (`count_reviewed_dropped`); removed there
    return combined.add_column(EXTRA_MARK, [False] * len(train_dataset) + [True] * (len(combined) - len(train_dataset)))


EXTRA_MARK = "_rlhf_ext_extra_preference"


def count_reviewed_dropped(dataset, limit: int | None, weight: int):
    """`dataset` without the extra-preference mark, and a warning when `max_length=limit` drops reviewed pairs: TRL
    drops over-long rows silently, and a pair a person labelled (counted `weight` times) is the costliest row to lose
    without a word."""
    if not isinstance(dataset, Dataset) or EXTRA_MARK not in dataset.column_names:
        return dataset
    if limit is not None:
        marked = dataset.select_columns([EXTRA_MARK, "chosen_ids", "rejected_ids"]).filter(lambda e: e[EXTRA_MARK])
        lengths, _ = _pair_lengths(marked)
        dropped = sum(n > limit for n in lengths)
        if dropped:
            warnings.warn(
                f"max_length={limit} drops {dropped // weight} of the {len(lengths) // weight} reviewed pair(s) from "
                f"extra_preferences (longer than {limit} tokens, prompt and chat template included; the longest is "
                f"{max(lengths)}): their labels are not trained on. Raise max_length to at least {max(lengths)} to "
                f"keep them.", stacklevel=4)
    return dataset.remove_columns(EXTRA_MARK)


def _pair_lengths(dataset) -> tuple[list[int], bool]:
    """Tokens of each pair (the longer of chosen and rejected): all of a Dataset (complete=True), or the first
    rows of a stream."""
    if isinstance(dataset, Dataset):
        import pyarrow.compute as pc

        out = []
        for batch in dataset.with_format("arrow").iter(batch_size=10_000):
            out.extend(pc.max_element_wise(pc.list_value_length(batch["chosen_ids"]),
                                           pc.list_value_length(batch["rejected_ids"])).to_pylist())
        return out, True
    return [_pair_length(row) for row in islice(iter(dataset), _STREAM_PEEK)], False


def _pair_length(row) -> int:
    return max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def _which(n: int, complete: bool) -> str:
    return f"{n} pairs" if complete else f"first {n} pairs (a streaming dataset: only those were read)"


def check_lengths(dataset, limit: int, name: str) -> None:
    """`max_length` that filters out every pair is an error naming the shortest; one that drops most is a warning."""
    lengths, complete = _pair_lengths(dataset)
    n, dropped = len(lengths), sum(length > limit for length in lengths)
    if not n or not dropped:
        return
    which = _which(n, complete)
    if dropped == n:
        raise ValueError(
            f"max_length={limit} drops all {which} of {name}: the shortest pair is {min(lengths)} tokens (the longer of "
            f"chosen and rejected, prompt and chat template included). Set max_length to at least {min(lengths)}, or to "
            f"None to keep every pair.")
    if 2 * dropped > n:
        warnings.warn(
            f"max_length={limit} drops {dropped} of the {which} of {name} (longer than {limit} tokens, prompt and chat "
            f"template included; the longest is {max(lengths)}); {n - dropped} remain. Raise max_length to keep more.",
            stacklevel=4)


def check_positions(dataset, positions: int | None, limit: int | None, name: str):
    """Pairs longer than the model's `positions` that `max_length=limit` does not filter are refused, with the fix:
    a learned position table (GPT-2's, RoBERTa's) would be indexed past its end at the first batch that holds one
    (an IndexError on CPU, a device-side assert on CUDA), and a rotary model would read positions it never trained
    on. TRL's RewardTrainer does not check. Pairs longer than `limit` are not counted: max_length drops them.
    Returns the dataset: a stream, of which only the first rows are read here, refuses a later such pair where it is
    read (the same error, not an IndexError at the step that holds it)."""
    if not positions or (limit is not None and limit <= positions):
        return dataset

    def unreadable(n: int) -> bool:  # past the positions, and kept by max_length
        return n > positions and (limit is None or n <= limit)

    lengths, complete = _pair_lengths(dataset)
    over = [n for n in lengths if unreadable(n)]
    if over:
        raise ValueError(f"{len(over)} of the {_which(len(lengths), complete)} of {name} are longer than the model's {positions} positions "
                         f"(the longest is {max(over)} tokens, prompt and chat template included), and "
                         + _positions_fix(positions, limit, "them"))
    if complete:
        return dataset

    def check(row):
        n = _pair_length(row)
        if unreadable(n):
            raise ValueError(f"A pair of {name} read after the first {len(lengths)} (a streaming dataset: those were "
                             f"checked at start-up) is {n} tokens long, prompt and chat template included, longer "
                             f"than the model's {positions} positions, and " + _positions_fix(positions, limit, "it"))
        return row

    return dataset.map(check, features=dataset.features)  # (its columns stay known: a map would drop them)


def _positions_fix(positions: int, limit: int | None, them: str) -> str:
    return (f"max_length={limit} keeps {them}: the model cannot read {them} (a learned position table is indexed "
            f"past its end; a rotary model reads positions it never trained on). Set max_length={positions} (longer "
            f"pairs are then dropped, as max_length drops them), or shorten the pairs.")


_POISSON1_CDF = list(accumulate(math.exp(-1) / math.factorial(n) for n in range(24)))


def hashed_bootstrap_weights(pair_ids: torch.Tensor, members: int, seed: int) -> torch.Tensor:
    """Poisson(1) bootstrap weights [B, members] drawn per pair from a seeded hash of its id: the same pair gets the
    same weights in every epoch and on every process, without a table over the whole dataset (streaming data)."""
    out = []
    for i in pair_ids.tolist():
        row = []
        for k in range(members):
            h = hashlib.blake2b(f"{seed}:{k}:{int(i)}".encode(), digest_size=8).digest()
            row.append(float(bisect.bisect_right(_POISSON1_CDF, int.from_bytes(h, "little") / 2.0**64)))
        out.append(row)
    return torch.tensor(out, dtype=torch.float).reshape(len(out), members)


def _prompt_length(example, tokenizer) -> int:
    """Tokens of the pair's prompt as TRL renders it before the response: an explicit `prompt`, or an implicit
    chat's messages before the last (chosen and rejected share them); -1 for an implicit text pair, whose prompt
    ends nobody knows where (the shared prefix stands in for it)."""
    prompt = example.get("prompt")
    if prompt is None and isinstance(example["chosen"], list):
        shared = 0
        while (shared < min(len(example["chosen"]), len(example["rejected"])) - 1
               and example["chosen"][shared] == example["rejected"][shared]):
            shared += 1
        prompt = example["chosen"][:shared]
    if prompt is None:
        return -1
    if isinstance(prompt, list):
        if not prompt:
            return 0
        return len(chat_ids(tokenizer, prompt, tools=example.get("tools"),
                            template_kwargs=example.get("chat_template_kwargs"), generation_prompt=True))
    return len(tokenizer(text=prompt)["input_ids"])


def with_prompt_length(dataset, tokenizer, num_proc: int | None = None):
    """`dataset` with a `prompt_length` column (`_prompt_length`), for the response lengths the length de-correlation
    and `length_corr` read; a column of that name in the user's data is replaced (it is not this count). Pre-tokenised
    pairs (chosen_ids / rejected_ids) are returned as they are."""
    columns = get_dataset_column_names(dataset) or []
    if tokenizer is None or "chosen" not in columns:
        return dataset
    # a Dataset's chat prompts are rendered by the template row by row (as TRL's own tokenisation): over
    # `dataset_num_proc` processes, as TRL spreads its own maps
    kwargs = {"desc": "Measuring the prompts", "num_proc": num_proc} if isinstance(dataset, Dataset) else {}
    return dataset.map(lambda e: {"prompt_length": _prompt_length(e, tokenizer)}, **kwargs)


@dataclass
class EnsemblePreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator + the pair index (for bootstrap weights) and response lengths."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        if "pair_id" in examples[0]:
            out["pair_id"] = torch.tensor([e["pair_id"] for e in examples])
        # response length = tokens after the prompt: its measured length (`with_prompt_length`), within the prefix
        # chosen and rejected share — that alone also took the responses' common opening words for prompt
        lens = []
        for e in examples:
            c, r = e["chosen_ids"], e["rejected_ids"]
            n = 0
            while n < min(len(c), len(r)) and c[n] == r[n]:
                n += 1
            if e.get("prompt_length", -1) >= 0:
                n = min(n, e["prompt_length"])
            lens.append((len(c) - n, len(r) - n))
        out["response_length"] = torch.tensor([a for a, _ in lens] + [b for _, b in lens], dtype=torch.float)
        return out
