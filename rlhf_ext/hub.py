"""Hugging Face Hub I/O for what rlhf_ext writes: push a saved folder (policy adapter, reward ensemble) with its
model card, and fetch a repo so `load_reward_model("user/repo")` works like a local folder."""

from __future__ import annotations

from pathlib import Path


def looks_like_repo_id(name: str) -> bool:
    """An `org/name` Hub id that is not also a local path."""
    from .models import is_hub_id

    s = str(name)
    return not Path(s).expanduser().exists() and "/" in s and is_hub_id(s)


def push_folder(folder, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str = "Upload with rlhf_ext",
                path_in_repo: str | None = None) -> str:
    """Create `repo_id` if needed and upload every file of `folder` in one commit (under `path_in_repo`, else at the
    root). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision, repo_type="model", path_in_repo=path_in_repo)
    except Exception as e:  # noqa: BLE001 — offline, auth, permissions: say which, and that nothing was lost
        raise OSError(f"Could not upload {folder} to the Hugging Face Hub as {repo_id!r} ({type(e).__name__}: {e}). "
                      f"Nothing local was changed or lost; check the network and your token "
                      f"(`huggingface-cli login` or HF_TOKEN), then push again.") from e
    return str(getattr(info, "commit_url", info))


def download(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local snapshot of a model repo (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token))
    except Exception as e:  # noqa: BLE001 — offline, missing repo, auth: say which and how
        raise OSError(f"Could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Without "
                      f"network access, pass the local folder the artifact was saved to.") from e
