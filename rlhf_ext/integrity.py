"""Files that survive a crash and say when they are broken: atomic folders, checksum manifests, named errors.

A folder (checkpoint, reward artifact, saved policy) is written under `<name>.tmp` and renamed into place, so a
killed run leaves the old folder or the new one, never half of one. Its `manifest.json` (written last) lists the
SHA-256 and size of every file; loading verifies them, so a truncated file *or* bytes overwritten behind an intact
header is reported by name instead of loading silently or failing deep inside safetensors/JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"


class CorruptFileError(RuntimeError):
    """A file of a checkpoint or artifact is missing, truncated or altered."""

    def __init__(self, path, problem: str, fix: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}. {fix}")


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder, extra: dict | None = None) -> dict:
    """Record size + SHA-256 of every file under `folder` (except the manifest itself) in `manifest.json`."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}
    manifest = {"files": files, **(extra or {})}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(folder, fix: str, required: tuple[str, ...] = ()) -> bool:
    """Check every file listed in the manifest (and every `required` one). Returns False when there is no manifest
    (folders written before manifests existed); raises CorruptFileError naming the first bad file."""
    folder = Path(folder)
    for name in required:
        if not (folder / name).is_file():
            raise CorruptFileError(folder / name, "missing", fix)
    mf = folder / MANIFEST
    if not mf.is_file():
        return False
    try:
        files = json.loads(mf.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorruptFileError(mf, f"unreadable manifest ({e})", fix) from None
    for name, rec in files.items():
        p = folder / name
        if not p.is_file():
            raise CorruptFileError(p, "missing (listed in the manifest)", fix)
        if p.stat().st_size != rec["bytes"]:
            raise CorruptFileError(p, f"truncated or resized ({p.stat().st_size} bytes, manifest says {rec['bytes']})", fix)
        if sha256(p) != rec["sha256"]:
            raise CorruptFileError(p, "content differs from its checksum in the manifest (altered or damaged)", fix)
    return True


def checkpoint_number(p: Path) -> int:
    return int(p.name.split("-")[-1])


def numbered_checkpoints(output_dir) -> list[Path]:
    """The `checkpoint-N` folders in `output_dir`, newest (highest N) first."""
    return sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                  key=checkpoint_number, reverse=True)


def newest_verified_checkpoint(output_dir, required: tuple[str, ...]) -> str | None:
    """The newest `checkpoint-N` in `output_dir` whose manifest verifies with its `required` files (what resuming
    reads): a checkpoint damaged or cut short by a crash is skipped with a warning, not resumed into an error."""
    import warnings

    for p in numbered_checkpoints(output_dir):
        try:
            if verify_manifest(p, "", required=required):
                return str(p)
            warnings.warn(f"{p} has no manifest (written by an older rlhf_ext, or incomplete): skipped.")
        except CorruptFileError as e:
            warnings.warn(f"Skipping damaged checkpoint {p}: {e}")
    return None


def resume_folder(resume_from_checkpoint, output_dir, required: tuple[str, ...]) -> str:
    """What `train(resume_from_checkpoint=…)` resumes from: True — the newest checkpoint in `output_dir` that
    verifies (`newest_verified_checkpoint`), or a ValueError when there is none; a folder — itself, or a
    FileNotFoundError when it is not there."""
    if resume_from_checkpoint is True:
        found = newest_verified_checkpoint(output_dir, required)
        if found is None:
            raise ValueError(f"No complete checkpoint found in {output_dir} to resume from (a run saves them with "
                             f"save_strategy='steps' or 'epoch'). Train without resume_from_checkpoint, or pass the "
                             f"checkpoint-N folder to resume from.")
        return found
    if not Path(resume_from_checkpoint).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={str(resume_from_checkpoint)!r}: no such folder. Pass a "
                                f"checkpoint-N folder, or True for the newest in output_dir.")
    return str(resume_from_checkpoint)


SUPERSEDED = "superseded-"


def supersede_later_checkpoints(output_dir, resumed_from) -> list[Path]:
    """Call when a run resumes from an explicit `resumed_from` folder, before it writes a checkpoint (main process
    only under DDP). When `resumed_from` is a `checkpoint-N` folder of `output_dir`, every `checkpoint-M` there with
    M > N belongs to the timeline the user went back from: each is renamed `superseded-checkpoint-M` (never deleted;
    `.2`, `.3`, … appended when an earlier abandoned timeline took the name), with a warning naming them, so that a
    later `resume_from_checkpoint=True` continues the new timeline instead of the abandoned one.

    The new name does not start with `checkpoint-`: `numbered_checkpoints` (resume=True, rotation, an earlier run's
    detection) and transformers' own `checkpoint-*` globs (its end-of-training save_total_limit=1 clean-up would
    delete a `checkpoint-M.superseded`) never see it. A folder outside `output_dir`, or not named `checkpoint-N`,
    supersedes nothing. Returns the new paths, oldest first."""
    import warnings

    start, out = Path(resumed_from).resolve(), Path(output_dir).resolve()
    if start.parent != out or not start.name.startswith("checkpoint-") or not start.name.split("-")[-1].isdigit():
        return []
    later = [p for p in reversed(numbered_checkpoints(out)) if checkpoint_number(p) > checkpoint_number(start)]
    moved = []
    for p in later:
        dest = out / f"{SUPERSEDED}{p.name}"
        n = 1
        while dest.exists():
            n += 1
            dest = out / f"{SUPERSEDED}{p.name}.{n}"
        os.replace(p, dest)
        moved.append(dest)
    if moved:
        warnings.warn(f"Resuming from {start.name} in {out}: {', '.join(p.name for p in later)} came after it in the "
                      f"timeline you went back from, so a later resume_from_checkpoint=True would have continued "
                      f"that one. Renamed (kept, never deleted): {', '.join(p.name for p in moved)}. Rename one back "
                      f"to checkpoint-M to return to that timeline.", UserWarning, stacklevel=2)
    return moved


def check_new_run(output_dir, found: list[str], overwrite_output_dir: bool, configured_resume=None) -> bool:
    """A new run (not resumed) in an `output_dir` where an earlier run left `found` (its checkpoints, oldest first,
    and whatever else the trainer would mix) would mix with it, and a later `resume_from_checkpoint=True` would
    continue the earlier run: a ValueError naming the three ways out, unless `overwrite_output_dir`. Returns True when
    the caller is to remove the earlier run (`remove_checkpoints` and its own files) before training.
    `configured_resume`: the config's `resume_from_checkpoint`, which train() does not read (as in Trainer)."""
    if not found:
        return False
    if not overwrite_output_dir:
        unread = (f" (resume_from_checkpoint={configured_resume!r} in the config is not read by train(), as in "
                  f"transformers' Trainer: pass it to train(resume_from_checkpoint=...))" if configured_resume else "")
        raise ValueError(
            f"output_dir {output_dir} holds an earlier run ({', '.join(found[-4:])}): a new run there would "
            f"mix with it. Resume it (train(resume_from_checkpoint=True); recipes: --resume_from_checkpoint "
            f"true){unread}, use another output_dir, or set overwrite_output_dir=True to replace it.")
    return True


def earlier_checkpoints(output_dir) -> list[str]:
    """The names of the `checkpoint-N` folders in `output_dir`, oldest first (what `check_new_run` lists)."""
    return [p.name for p in reversed(numbered_checkpoints(output_dir))]


def remove_checkpoints(output_dir) -> list[str]:
    """`overwrite_output_dir=True`: remove the `checkpoint-N` folders of an earlier run (superseded ones, which no
    resume reads, are kept). Returns their names."""
    removed = []
    for p in numbered_checkpoints(output_dir):
        shutil.rmtree(p)
        removed.append(p.name)
    return removed


def remove_oldest_checkpoints(output_dir, newest: int, limit: int | None, keep=None) -> list[str]:
    """`save_total_limit`, as transformers applies it: after `checkpoint-{newest}` is written, delete the oldest
    checkpoints until at most `limit` remain — never `newest` itself nor `keep` (the best model's checkpoint; with
    it `limit` may be exceeded by one, as in transformers). Only folders numbered below `newest` are candidates (a
    higher-numbered one belongs to another run), and only `checkpoint-N` ones (transformers' rotation also matched
    `checkpoint-N.tmp` and superseded folders). Returns the removed paths."""
    if not limit or limit < 1:
        return []
    ours = [p for p in reversed(numbered_checkpoints(output_dir)) if checkpoint_number(p) <= newest]  # oldest first
    protected = {str(Path(output_dir).resolve() / f"checkpoint-{newest}")}
    if keep is not None and Path(keep).is_dir():
        protected.add(str(Path(keep).resolve()))
    allowed, removed = max(limit, len(protected)), []
    for p in ours:
        if len(ours) - len(removed) <= allowed:
            break
        if str(p.resolve()) not in protected:
            shutil.rmtree(p)
            removed.append(str(p))
    return removed


def write_text_atomic(path, text: str) -> None:
    """Write to a private temporary file, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{id(text):x}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_folder(final, manifest_extra: dict | None = None):
    """Yield a temporary folder; on success write its manifest and move it into place.

    A new `final` appears by one rename (all or nothing). An existing `final` (e.g. an output_dir that also holds
    checkpoints) keeps its other contents: its old manifest is removed first, the new files replace the old ones,
    and the new manifest lands last — a crash in between leaves a folder whose manifest check fails by name."""
    tmp = start_atomic_folder(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_atomic_folder(tmp, final, manifest_extra)


def start_atomic_folder(final) -> Path:
    """`atomic_folder` in two calls, for a folder several processes write into (a checkpoint under DDP: one process
    starts it, every process writes its files, one finishes it): the empty temporary folder `<final>.tmp` (what a
    killed earlier attempt left there is removed first)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"Cannot save to {final}: it is a file, and a save writes a folder there. Choose "
                                 f"another path (or remove the file).")
    tmp = atomic_tmp(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def atomic_tmp(final) -> Path:
    """Where `start_atomic_folder` builds `final` (every process of a multi-process save writes there)."""
    final = Path(final)
    return final.with_name(final.name + ".tmp")


def finish_atomic_folder(tmp, final, manifest_extra: dict | None = None) -> None:
    """The second half of `atomic_folder`: the manifest of everything in `tmp`, then `tmp` moved into place as
    `final` (merged into an existing `final`, the manifest last)."""
    tmp, final = Path(tmp), Path(final)
    try:
        _default_permissions(tmp)  # safetensors (ours and save_pretrained's) writes 0600: the folder gets one mode
        write_manifest(tmp, manifest_extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not final.exists():
        os.replace(tmp, final)
        return
    (final / MANIFEST).unlink(missing_ok=True)
    for item in tmp.iterdir():
        if item.name == MANIFEST:
            continue
        dest = final / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
    os.replace(tmp / MANIFEST, final / MANIFEST)
    shutil.rmtree(tmp, ignore_errors=True)


def read_json(path, fix: str) -> dict:
    """json.loads with the file named in the error."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(path, "missing", fix)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(path, f"not valid JSON ({e})", fix) from None


def save_tensors(tensors: dict, path) -> None:
    """safetensors.torch.save_file of detached, contiguous CPU copies (what save_file insists on)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _default_permissions(folder) -> None:
    """Every file under `folder` rw-r--r-- under the usual umask, like every other file we write (safetensors writes
    0600, which a shared model folder should not inherit). `atomic_folder` applies it to everything it saves."""
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(folder).rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def load_safetensors(path, fix: str) -> dict:
    """safetensors.torch.load_file with the file named in the error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(path, "missing", fix)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(path, f"not a readable safetensors file ({e})", fix) from None


def ensure_writable_dir(path, what: str = "output_dir") -> Path:
    """Create `path` if needed and prove a file can be written there, before hours of training depend on it."""
    import tempfile

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}={str(path)!r} is a file; it must be a folder (checkpoints and the model are written "
                         f"there). Choose another path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{what}={str(path)!r} is not writable ({e.strerror or e}). Choose a folder you can write "
                         f"to, or fix its permissions; nothing has been trained yet.") from e
    return path
