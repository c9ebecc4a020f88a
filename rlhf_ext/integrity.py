"""Files that survive a crash and say when they are broken: atomic folders, checksum manifests, named errors.

A folder (checkpoint, reward artifact, saved policy) is written under `<name>.tmp` and renamed into place, so a
killed run leaves the old folder or the new one, never half of one. Its `manifest.json` (written last) lists the
SHA-256 and size of every file; loading verifies them, so a truncated file *or* bytes overwritten behind an intact
header is reported by name instead of loading silently or failing deep inside safetensors/JSON.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
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
        if not (p / MANIFEST).is_file():  # before its required files: an older version's folder is not "damaged"
            warnings.warn(f"{p} has no manifest (written by an older rlhf_ext, or incomplete): skipped.")
            continue
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
    folder = Path(resume_from_checkpoint).expanduser()  # `~` as output_dir takes it (TrainingArguments expands it)
    if not folder.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={str(resume_from_checkpoint)!r}: no such folder (relative "
                                f"paths are read from {Path.cwd()}). Pass a checkpoint-N folder, or True for the "
                                f"newest in output_dir.")
    return str(folder)


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


# the temporary files of write_text_atomic and queue.keep_jsonl_records: `<name>.<pid>.<hex>.tmp`
_TEXT_TMP = re.compile(r"^.+\.(\d+)\.[0-9a-f]+\.tmp$")
_TEMP_SERIAL = itertools.count()  # next() is atomic under the GIL: two threads never get one name


def temp_file_for(path: Path) -> Path:
    """A private temporary file beside `path` to write and then rename onto it, named by this process's pid, which
    `sweep_temp_files` reads to remove it once the writer is gone (`_TEXT_TMP`), and a serial of this process."""
    return path.with_name(f"{path.name}.{os.getpid()}.{next(_TEMP_SERIAL):x}.tmp")


def write_text_atomic(path, text: str) -> None:
    """Write to a private temporary file, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = temp_file_for(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk must not also keep the half file that filled it
        tmp.unlink(missing_ok=True)
        raise


def sweep_temp_files(folder) -> list[Path]:
    """Remove what writers killed inside `write_text_atomic` left in `folder` (their temporary files; a live
    writer's, named by its pid, is kept). Returns the removed paths."""
    removed = []
    for p in Path(folder).glob("*.tmp"):
        m = _TEXT_TMP.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (another user's counts: it may be writing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: there, and not ours
        return True
    return True


@contextmanager
def atomic_folder(final, manifest_extra: dict | None = None, fix: str | None = None):
    """Yield a temporary folder; on success write its manifest and move it into place.

    A new `final` appears by one rename (all or nothing). An existing `final` (e.g. an output_dir that also holds
    checkpoints) keeps its other contents: its old manifest is removed first, the new files replace the old ones,
    and the new manifest lands last — a crash in between leaves a folder whose manifest check fails by name.

    The temporary folder is this process's own (`<final>.<pid>.tmp`): two writers of one path never delete each
    other's. Whatever stops the writes removes it; a failed write (a full disk) is one OSError naming `final`
    (`writing_folder`), followed by `fix` (default: `final` is as it was; free space and save again)."""
    tmp = start_atomic_folder(final, private=True)
    with writing_folder(tmp, final, fix):
        yield tmp
    finish_atomic_folder(tmp, final, manifest_extra, fix)


def start_atomic_folder(final, private: bool = False) -> Path:
    """`atomic_folder` in two calls, for a folder several processes write into (a checkpoint under DDP: one process
    starts it, every process writes its files, one finishes it): the empty temporary folder `atomic_tmp(final,
    private)` (what a killed earlier attempt left there is removed first). Wrap the writes in `writing_folder`."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"Cannot save to {final}: it is a file, and a save writes a folder there. Choose "
                                 f"another path (or remove the file).")
    tmp = atomic_tmp(final, private)
    shutil.rmtree(tmp, ignore_errors=True)
    if private:
        _remove_dead_writers(final)
    tmp.mkdir(parents=True)
    return tmp


def atomic_tmp(final, private: bool = False) -> Path:
    """Where `start_atomic_folder` builds `final`: `<final>.tmp`, shared by every process of a multi-process save
    (they all write there), or with `private` `<final>.<pid>.tmp`, this process's alone."""
    final = Path(final)
    return final.with_name(f"{final.name}.{os.getpid()}.tmp" if private else f"{final.name}.tmp")


def _remove_dead_writers(final) -> None:
    """The private temporary folders of `final` that killed processes left (a live writer's is kept)."""
    final = Path(final)
    for p in final.parent.iterdir() if final.parent.is_dir() else ():
        pid = p.name[len(final.name) + 1:-len(".tmp")] if p.name.startswith(final.name + ".") else ""
        if p.name.endswith(".tmp") and pid.isdigit() and p.is_dir() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def finish_atomic_folder(tmp, final, manifest_extra: dict | None = None, fix: str | None = None) -> None:
    """The second half of `atomic_folder`: the manifest of everything in `tmp`, then `tmp` moved into place as
    `final` (merged into an existing `final`, the manifest last)."""
    tmp, final = Path(tmp), Path(final)
    with writing_folder(tmp, final, fix):
        _default_permissions(tmp)  # safetensors (ours and save_pretrained's) writes 0600: the folder gets one mode
        write_manifest(tmp, manifest_extra)
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


@contextmanager
def writing_folder(tmp, final, fix: str | None = None):
    """Around the writes that fill `tmp`, the temporary folder of `final`. Whatever stops them, `tmp` is removed (on
    a full disk, the half copy that filled it must not stay). A failed write is raised as one OSError (errno kept;
    ENOSPC for a full disk) naming `final` and the cause, then `fix` — what is intact and how to go on; a "{remedy}"
    in it becomes "Free space on that disk" (or, for another failure, "Fix what the error names"). Libraries report
    a full disk in their own words — torch.save "basic_ios::clear: iostream error" or "unexpected pos 64 vs 0" (a
    RuntimeError), safetensors a SafetensorError, PEFT a bare OSError — none saying which save failed or that the
    earlier ones are intact. Anything else (a bug, Ctrl-C) is raised as it is."""
    tmp, final = Path(tmp), Path(final)
    try:
        yield
    except BaseException as e:
        if isinstance(e, SaveFailedError):  # a nested save (an artifact inside a checkpoint) said it: ours names ours
            failure = None if e.folder == final else (e.errno, e.cause)
        else:
            failure = _write_failure(e, tmp if tmp.exists() else final.parent)  # before the removal frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise SaveFailedError(final, *failure, fix) from e


class SaveFailedError(OSError):
    """A folder could not be written (`writing_folder`): the message names it, the cause and what to do."""

    def __init__(self, folder: Path, code: int, cause: str, fix: str | None = None):
        self.folder, self.cause = folder, cause
        fix = fix or f"{folder} is as it was (the half-written copy was removed). {{remedy}}, then save again."
        remedy = "Free space on that disk" if code == errno.ENOSPC else "Fix what the error names"
        super().__init__(code, f"Could not write {folder}: {cause}. {fix.replace('{remedy}', remedy)}")


# How libraries word a failed write that is not an OSError (torch.save's C++ stream, safetensors' Rust I/O)
_WRITE_FAILED = re.compile(r"iostream error|unexpected pos|inline_container|PytorchStreamWriter|os error \d+|"
                           r"I/O error|IoError|No space left|Disk quota|Input/output error|file write failed", re.I)
# Less free space than this where a write failed: the disk is (as good as) full, whatever the library said
_FULL_DISK_BYTES = 16 << 20


def _write_failure(e: BaseException, where: Path) -> tuple[int, str] | None:
    """(errno, cause) when `e`, raised while files were written at `where`, is a failed write; None for anything
    else (a bug in what writes, a KeyboardInterrupt), which its caller raises as it is."""
    if not isinstance(e, Exception):
        return None
    text = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return errno.ENOSPC, text if "No space left" in text else f"No space left on device ({text})"
    if not (isinstance(e, OSError) or _WRITE_FAILED.search(str(e))):
        return None
    free = _free_bytes(where)
    if free is not None and free < _FULL_DISK_BYTES:
        return errno.ENOSPC, f"No space left on device ({free} bytes free there; the write failed with {text})"
    return getattr(e, "errno", None) or errno.EIO, text


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def checkpoint_fix(final) -> str:
    """`writing_folder`'s `fix` for a `checkpoint-N` folder: the checkpoint resuming reads is intact, and how to
    resume from it."""
    final = Path(final)
    earlier = [p.name for p in numbered_checkpoints(final.parent) if p.name != final.name]
    if not earlier:
        return (f"Nothing of {final.name} was kept, and there is no earlier checkpoint to resume from: {{remedy}} "
                f"(or use an output_dir on a larger disk), then start the run again.")
    return (f"The previous checkpoint, {earlier[0]}, is intact (nothing of {final.name} was kept). {{remedy}} (or "
            f"lower save_total_limit, or use an output_dir on a larger disk), then resume from it with "
            f"train(resume_from_checkpoint=True) (recipes: --resume_from_checkpoint true).")


RUN_LOCK = ".rlhf_ext.lock"


class OutputDirInUseError(RuntimeError):
    """Another training run (a live process) holds the lock of the output_dir."""


@contextmanager
def output_dir_lock(output_dir, accelerator=None):
    """One training run at a time in `output_dir`: two would write into each other's `checkpoint-N.tmp`, rotate each
    other's checkpoints and mix their monitor logs — each passes the earlier-run check before the other has written
    anything. For the body, the main process holds `fcntl.flock` on `output_dir/.rlhf_ext.lock` (with its pid in it,
    for the other run's message; the file is removed on the way out). The OS drops a flock with its process however
    it ends, so a run killed with kill -9 leaves no stale lock. Under DDP (`accelerator`) only the main process
    locks and every rank gets its verdict (`as_main_process_sees_it`): all raise OutputDirInUseError together."""
    from .distributed import as_main_process_sees_it

    held = []

    def take() -> str | None:
        try:
            held.append(_take_run_lock(Path(output_dir)))
        except OutputDirInUseError as e:
            return str(e)
        return None

    problem = take() if accelerator is None else as_main_process_sees_it(accelerator, take)
    try:
        if problem:
            raise OutputDirInUseError(problem)
        yield
    finally:
        for fd in held:
            _release_run_lock(Path(output_dir), fd)


def _take_run_lock(output_dir: Path) -> int | None:
    """The locked file descriptor of `output_dir/RUN_LOCK`; OutputDirInUseError when a live process holds it; None
    where there is no flock (Windows, some network filesystems: a warning, and the run goes on unguarded)."""
    import warnings

    try:
        import fcntl
    except ImportError:
        return None
    path = output_dir / RUN_LOCK
    output_dir.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputDirInUseError(_in_use_message(output_dir, holder)) from None
        except OSError as e:
            os.close(fd)
            warnings.warn(f"Cannot lock {path} ({e.strerror or e}): nothing stops a second run from starting in "
                          f"{output_dir} meanwhile; start one run per output_dir.", stacklevel=4)
            return None
        # the run before us removes the file as it lets go: a lock on a removed file would keep nobody out
        try:
            st, own = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:  # a full disk: the lock holds all the same, only another run's message lacks the pid
        pass
    return fd


def _in_use_message(output_dir: Path, holder: str) -> str:
    who = f"pid {holder}" + (", this process" if holder == str(os.getpid()) else "") if holder.isdigit() else ""
    return (f"output_dir {output_dir} is in use by another training run{f' ({who})' if who else ''}, which holds "
            f"{output_dir / RUN_LOCK}. Two runs in one output_dir would write into each other's checkpoints and "
            f"monitor logs: use another output_dir, or wait for that run to end (its lock goes with its process, "
            f"however it ends).")


def _release_run_lock(output_dir: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:  # removed while still held: a run that opened it meanwhile finds it gone and opens a fresh one
        (output_dir / RUN_LOCK).unlink(missing_ok=True)
    except OSError:
        pass
    os.close(fd)


def read_json(path, fix: str) -> dict:
    """json.loads with the file named in the error."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(path, "missing", fix)
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise CorruptFileError(path, f"not valid JSON ({e})", fix) from None


def save_tensors(tensors: dict, path) -> None:
    """safetensors.torch.save_file of detached, contiguous CPU copies (what save_file insists on). Tensors that share
    memory — a tied embedding and LM head, both in an adapter's state after `resize_token_embeddings` — are saved as
    separate copies (save_file refuses shared ones; PEFT's save_pretrained copies them alike)."""
    from safetensors.torch import save_file

    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        shared = v.untyped_storage().data_ptr() in seen
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v.clone() if shared else v
    save_file(out, str(path))


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
