"""Hugging Face Hub I/O for what rlhf_ext writes: push a saved folder (policy adapter, reward ensemble) with its
model card, and fetch a repo so `load_reward_model("user/repo")` works like a local folder."""

from __future__ import annotations

from pathlib import Path


def looks_like_repo_id(name: str) -> bool:
    """An `org/name` Hub id that is not also a local path."""
    from .models import is_hub_id

    s = str(name)
    return not Path(s).expanduser().exists() and "/" in s and is_hub_id(s)


def card_hub_id(name) -> str | None:
    """`name` as a model card's `base_model` / `datasets` entry may hold it: a Hub id, or None for a local path or
    the embedded default's short name (the Hub refuses a commit whose card names what is not a repository)."""
    from .models import EMBEDDED_MODELS, is_hub_id

    s = str(name) if name else ""
    if not s or s.lower() in EMBEDDED_MODELS or Path(s).expanduser().exists() or not is_hub_id(s):
        return None
    return s


def card_base_model(name_or_path) -> str | None:
    """A card's `base_model` for the model trained from `name_or_path`: its Hub id (the embedded default's too), or
    None for a local folder or a model given without a name."""
    from .models import loadable_reference

    return card_hub_id(loadable_reference(name_or_path)) if name_or_path else None


def push_folder(folder, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str = "Upload with rlhf_ext",
                path_in_repo: str | None = None, delete_patterns: list[str] | None = None) -> str:
    """Create `repo_id` if needed and upload every file of `folder` in one commit (under `path_in_repo`, else at the
    root), deleting the repo's files that match `delete_patterns` in the same commit. Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:  # transformers' hub_revision: the branch is made from main the first time
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision, repo_type="model", path_in_repo=path_in_repo,
                                 delete_patterns=delete_patterns)
    except Exception as e:  # noqa: BLE001 — offline, auth, permissions: say which, and that nothing was lost
        raise OSError(f"Could not upload {folder} to the Hugging Face Hub as {repo_id!r} ({type(e).__name__}: {e}). "
                      f"Nothing local was changed or lost; check the network and your token "
                      f"(`hf auth login` or HF_TOKEN), then push again.") from e
    return str(getattr(info, "commit_url", info))


def download(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local snapshot of a model repo (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token))
    except Exception as e:  # noqa: BLE001 — offline, missing repo, auth: say which and how
        raise OSError(f"Could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Without "
                      f"network access, pass the local folder the artifact was saved to.") from e


def hub_reward_artifact(name) -> Path | None:
    """The local snapshot of a Hub repo holding an rlhf_ext reward artifact (what `RewardEnsembleTrainer.push_to_hub`
    uploads; from the cache when offline); None for a local path, or a repo without the artifact's spec file."""
    from huggingface_hub import hf_hub_download

    from .reward.artifact import SPEC_FILE

    if not looks_like_repo_id(str(name)):
        return None
    try:
        hf_hub_download(str(name), SPEC_FILE)
    except Exception:  # noqa: BLE001 — no such file or repo, or neither cached nor reachable: not an artifact here
        return None
    return download(str(name))


def repo_id_for_push(args, repo_id: str | None, commit_message, caller: str) -> str:
    """Where `push_to_hub` uploads: `repo_id`, else `hub_model_id`, else the output_dir's name (as transformers). Its
    first argument is the commit message, as in transformers' Trainer: `push_to_hub("you/rm")` would upload to that
    default with "you/rm" as the message — refused, naming the keyword."""
    if repo_id is None and isinstance(commit_message, str) and looks_like_repo_id(commit_message):
        raise ValueError(f"{caller}.push_to_hub({commit_message!r}): the first argument is the commit message (as in "
                         f"transformers' Trainer), so this would upload to {default_repo_id(args)!r}. Pass the repo "
                         f"by name: push_to_hub(repo_id={commit_message!r}), or set hub_model_id.")
    return repo_id or default_repo_id(args)


def reach_repo_or_explain(create_repo, args, caller: str) -> None:
    """`push_to_hub=True`: transformers' Trainer creates the repo when the trainer is built (`init_hf_repo`); offline
    or without a token that fails with the HTTP client's bare error. Say what failed and the ways on."""
    try:
        create_repo()
    except (TypeError, AttributeError):  # a bug or a version mismatch, not the network: as it is
        raise
    except Exception as e:  # noqa: BLE001 — offline, auth, permissions: say which
        raise OSError(f"push_to_hub=True: {caller} could not create or reach the Hub repository "
                      f"{default_repo_id(args)!r} ({type(e).__name__}: {e}). Nothing has trained yet. Check the network "
                      f"and your token (`hf auth login` or HF_TOKEN), or set push_to_hub=False and upload after "
                      f"training with trainer.push_to_hub().") from e


def default_repo_id(args) -> str:
    """Where `push_to_hub` uploads without a `repo_id`: `hub_model_id`, else the output_dir's name (as transformers)."""
    return args.hub_model_id or Path(args.output_dir).absolute().name  # "." names the folder, as transformers'


# What `Trainer.push_to_hub(**kwargs)` passes on to the model card (transformers' `create_model_card` and TRL's):
# the card's metadata, nothing else.
CARD_FIELDS = ("model_name", "tags", "dataset_name", "dataset", "dataset_tags", "license", "language",
               "finetuned_from")


def card_metadata(kwargs: dict, caller: str, method: str = "push_to_hub") -> dict:
    """The model-card fields of `push_to_hub(**kwargs)`, validated: an unknown keyword is a TypeError naming the
    ones that are used (transformers' `create_model_card` refuses them too; silently dropping one would upload a
    card without what the user asked for)."""
    unknown = sorted(set(kwargs) - set(CARD_FIELDS))
    if unknown:
        raise TypeError(f"{caller}.{method}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"the model-card fields it takes are {', '.join(CARD_FIELDS)}.")
    return {k: v for k, v in kwargs.items() if v is not None}


def _as_list(v) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def yaml_value(value) -> str:
    """`value` (a string or a list of strings) as one line of YAML, quoted where YAML would read it otherwise: a tag
    such as `trackio:https://…` (TRL's), `yes`, `1.0` or `#x` written bare broke the front matter or changed type."""
    import yaml

    value = str(value) if isinstance(value, str) else [str(v) for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def framework_versions() -> str:
    """The card's "Framework versions" section, as TRL's cards give it (rlhf_ext and PEFT added): what a reader needs
    to load the artifact as it was saved."""
    from importlib.metadata import PackageNotFoundError, version

    rows = []
    for name, dist in (("rlhf_ext", "rlhf_ext"), ("TRL", "trl"), ("Transformers", "transformers"), ("PEFT", "peft"),
                       ("Pytorch", "torch"), ("Datasets", "datasets"), ("Tokenizers", "tokenizers")):
        try:
            rows.append(f"- {name}: {version(dist)}")
        except PackageNotFoundError:  # rlhf_ext run from a checkout that was never installed
            continue
    return "\n### Framework versions\n\n" + "\n".join(rows) + "\n"


def with_card_metadata(card: str, meta: dict) -> str:
    """`card` (YAML front matter, then a `# title`) with `meta` merged in: extra tags after the card's own,
    `datasets`, `license`, `language`, `base_model` (finetuned_from) and `model_name` as the title."""
    if not meta:
        return card
    head, sep, body = card.removeprefix("---\n").partition("\n---\n")
    if not sep:
        head, body = "", card
    import yaml

    lines = head.splitlines()
    fields = {line.split(":", 1)[0]: i for i, line in enumerate(lines) if ":" in line and not line.startswith(" ")}

    def put(key, value):
        if key in fields:
            lines[fields[key]] = f"{key}: {value}"
        else:
            fields[key] = len(lines)
            lines.append(f"{key}: {value}")

    extra = _as_list(meta.get("tags", []))
    if extra:
        own = [str(t) for t in (yaml.safe_load(head) or {}).get("tags") or []]
        put("tags", yaml_value(list(dict.fromkeys(own + [str(t) for t in extra]))))
    # transformers' create_model_card puts dataset_tags in `datasets`; a local folder is no dataset id (the Hub
    # refuses the card)
    datasets = [d for d in (*_as_list(meta.get("dataset_name", [])), *_as_list(meta.get("dataset", [])),
                            *_as_list(meta.get("dataset_tags", []))) if card_hub_id(d)]
    if datasets:
        put("datasets", yaml_value(list(dict.fromkeys(datasets))))
    for key in ("license", "language"):
        if key in meta:
            put(key, yaml_value(meta[key]))
    if card_hub_id(meta.get("finetuned_from")):
        put("base_model", yaml_value(meta["finetuned_from"]))
    if "model_name" in meta:
        body_lines = body.splitlines()
        at = next((i for i, line in enumerate(body_lines) if line.startswith("# ")), None)
        if at is None:
            body_lines[:0] = [f"# {meta['model_name']}", ""]
        else:
            body_lines[at] = f"# {meta['model_name']}"
        body = "\n".join(body_lines) + ("\n" if body.endswith("\n") else "")
    return "---\n" + "\n".join(lines) + "\n---\n" + body


def push_checkpoint(args, path, repo_id: str, push_model, label: str) -> None:
    """A checkpoint reaching the Hub, as transformers' `hub_strategy` says: "every_save" (the default) uploads the
    model as it is at this checkpoint (`push_model(commit_message=...)`, the trainer's own `push_to_hub`);
    "checkpoint" also uploads the checkpoint folder as `last-checkpoint/` (resume from it), "all_checkpoints" every
    checkpoint folder under its own name; "end" nothing (the final `save_model` / `push_to_hub` does). A failed upload
    is a warning, never the end of a long run: the checkpoint is on disk."""
    import warnings

    strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy))
    if strategy == "end":
        return
    message = f"Training in progress, {label}"
    try:
        push_model(commit_message=message)
        if strategy in ("checkpoint", "all_checkpoints"):
            push_folder(path, repo_id, private=args.hub_private_repo, token=args.hub_token,
                        revision=getattr(args, "hub_revision", None), commit_message=message + " (checkpoint)",
                        path_in_repo="last-checkpoint" if strategy == "checkpoint" else Path(path).name)
    except Exception as e:  # noqa: BLE001 — any network or Hub error
        warnings.warn(f"Uploading {label} to the Hub failed ({type(e).__name__}: {e}); training goes on, and {path} "
                      f"holds the checkpoint.", UserWarning, stacklevel=3)
