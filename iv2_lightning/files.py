"""Files that survive a kill and files that are safe to read: pure Python + torch, no Lightning.

* :func:`atomic_write` (and :func:`write_bytes_atomic` / :func:`write_text_atomic` /
  :func:`write_json_atomic`, :func:`atomic_path`): the bytes go to ``.<name>.partial`` in the
  destination's own folder, are flushed to disk, and the file is renamed over the destination
  (``os.replace``, atomic within one filesystem). A reader finds the old file or the new one, never
  half of one; a kill leaves at most the ``.partial`` file, which the next write replaces.
* :func:`load_checkpoint_file`: ``torch.load(weights_only=True)`` with errors that name the file;
  a pickle that would run code is refused (:class:`UnsafeCheckpointError`).
* :func:`checkpoint_problem` / :func:`newest_readable_checkpoint`: what resuming uses to pass over a
  damaged checkpoint with a warning.
* :func:`save_checkpoint_file` / :func:`verify_file`: every checkpoint we write gets a record beside it
  (``<name>.sha256.json``: its size and sha256, written atomically); every reader checks a file against
  its record first. A file that does not match is *damaged* (:class:`DamagedCheckpointError`, the
  record and the difference named); a file without a record (written by another tool) is *unverified*
  and loads with a note. While a checkpoint is being replaced the record accepts the old file and the
  new one, so a kill between the two renames leaves a pair that still verifies.

Both ``models/`` (weights export and ``init_from``) and the Lightning side (:mod:`iv2_lightning.io`)
use these, so they live apart from anything that imports Lightning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


# -- atomic files ------------------------------------------------------------------------------------


def partial_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` stages ``path``: a hidden sibling, so the rename stays on one filesystem."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, or its cause or context: torch's zip writer reports a failed
    write as a RuntimeError raised while the OSError is handled)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path for a writer that takes a file name (``safetensors.torch.save_file``): on
    leaving the block without an error the file written there is synced and renamed over ``path``;
    on an error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        failed = _os_error_in(err)  # a full disk, a file-size limit, a vanished folder: say which file
        if failed is not None:
            raise OSError(
                failed.errno,
                f"could not write {path} ({failed.strerror or failed}); the file there before, if any, is untouched",
            ) from err
        if isinstance(err, Exception):  # e.g. safetensors' own error for a failed write
            err.add_note(f"while writing {path} (the file there before, if any, is untouched)")
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open ``path`` for writing such that it appears complete or not at all.

    Writes go to ``.<name>.partial`` beside ``path``; on leaving the block without an error the data
    is flushed, synced and the file renamed over ``path``; on an error the partial file is removed
    and ``path`` is untouched.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write writes whole files; mode must contain 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f
        f.flush()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- records of what was written -------------------------------------------------------------------

RECORD_SUFFIX = ".sha256.json"
_noted_unverified: set[str] = set()
_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, see verify_file


def record_path(path: str | os.PathLike) -> Path:
    """The record of ``path``: ``<name>.sha256.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + RECORD_SUFFIX)


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    return {"size": os.stat(path).st_size, "sha256": sha256_file(path)}


def write_file_record(
    path: str | os.PathLike, digest: dict[str, Any], previous: dict[str, Any] | None = None
) -> Path:
    """Write ``path``'s record atomically; ``previous`` (the digest of the file being replaced) is
    accepted too until the record is written again without it."""
    record = {"file": Path(path).name, "size": int(digest["size"]), "sha256": str(digest["sha256"])}
    if previous is not None:
        record["previous"] = {"size": int(previous["size"]), "sha256": str(previous["sha256"])}
    return write_json_atomic(record_path(path), record)


def verify_file(path: str | os.PathLike) -> tuple[str, str]:
    """``(status, message)``: ``"verified"`` (size and sha256 match the record), ``"damaged"`` (they do
    not) or ``"unverified"`` (no readable record beside the file)."""
    path = Path(path)
    rp = record_path(path)
    if not rp.is_file():
        return "unverified", (
            f"{path} has no {rp.name} beside it (not written by iv2_lightning?): its integrity could not be "
            "verified"
        )
    try:
        record = json.loads(rp.read_text())
        accepted = [record] + ([record["previous"]] if record.get("previous") else [])
        accepted = [(int(r["size"]), str(r["sha256"])) for r in accepted]
    except (ValueError, KeyError, TypeError, OSError) as err:
        return "unverified", f"{rp} is not a readable record ({err}): {path} could not be verified"
    stat = path.stat()
    size = stat.st_size
    if not any(size == s for s, _ in accepted):
        return "damaged", (
            f"{path} is damaged: {size} bytes, but {rp.name} records {accepted[0][0]} bytes written "
            "(cut short or changed after it was written)"
        )
    # one hash per file version: resuming, LightningCLI and the checkpoint loader each check the same file
    key = (str(path.resolve()), size, stat.st_mtime_ns)
    digest = _digests.get(key) or sha256_file(path)
    _digests[key] = digest
    if any(size == s and digest == h for s, h in accepted):
        return "verified", f"{path}: size and sha256 match {rp.name}"
    return "damaged", (
        f"{path} is damaged: its sha256 {digest[:12]}... does not match the {accepted[0][1][:12]}... that "
        f"{rp.name} recorded when it was written (the bytes changed on disk, or the file was replaced)"
    )


def check_file(path: str | os.PathLike) -> str:
    """:func:`verify_file`, raising :class:`DamagedCheckpointError` for a damaged file; an unverified
    one is noted in the log once per path. Returns the status."""
    status, message = verify_file(path)
    if status == "damaged":
        raise DamagedCheckpointError(message)
    if status == "unverified" and str(path) not in _noted_unverified:
        _noted_unverified.add(str(path))
        log.warning("%s", message)
    return status


def save_checkpoint_file(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically, with its record. Until the new file is renamed into place
    the record accepts both the old file and the new one; then it is rewritten for the new one alone."""
    path = Path(path)
    previous = None
    if path.is_file() and verify_file(path)[0] == "verified":
        old = json.loads(record_path(path).read_text())
        previous = {"size": old["size"], "sha256": old["sha256"]}
    with atomic_path(path) as tmp:
        # through a Python file: a failed write (full disk) surfaces as the OSError it is
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        digest = file_digest(tmp)
        write_file_record(path, digest, previous)
    write_file_record(path, digest)
    return path


def remove_file_and_record(path: str | os.PathLike) -> None:
    for p in (Path(path), record_path(path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# -- checkpoints --------------------------------------------------------------------------------------


class UnreadableCheckpointError(ValueError):
    """A checkpoint that cannot be loaded (truncated, not a torch file); names the file and why."""


class DamagedCheckpointError(UnreadableCheckpointError):
    """A checkpoint that does not match the size and sha256 recorded when it was written."""


class UnsafeCheckpointError(UnreadableCheckpointError):
    """A checkpoint whose pickle names Python objects beyond tensors and plain data: loading it
    would run code, so it is refused."""


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint at all: the caller reports the load error instead
        return []


def load_checkpoint_file(
    path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False, verify: bool = True
) -> Any:
    """``torch.load(path, weights_only=True)``, with errors that name the file: a file that does not
    match its record raises :class:`DamagedCheckpointError` (``verify``; see :func:`verify_file`), a
    pickle that would run code :class:`UnsafeCheckpointError` (listing what it would import), anything
    else that stops the load :class:`UnreadableCheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if verify:
        check_file(path)
    # mmap needs the zip format of torch.save; an older or foreign pickle is read as it is
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe or "Weights only load failed" in str(err):
            raise UnsafeCheckpointError(
                f"{path}: refusing to load this checkpoint: unpickling it would "
                + (f"import {unsafe}" if unsafe else "need Python objects beyond tensors and plain data")
                + ", which can run code from the file. Only tensors and plain data are loaded "
                "(torch.load(weights_only=True)). Delete or move the file, or re-save its tensors in an "
                "environment you trust."
            ) from err
        raise UnreadableCheckpointError(f"{path}: not a readable checkpoint ({err})") from err
    except Exception as err:
        size = path.stat().st_size
        raise UnreadableCheckpointError(
            f"{path}: not a readable checkpoint ({size} bytes; {type(err).__name__}: {err}); "
            "it may have been cut short by a crash or a full disk"
        ) from err


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from (None when it loads). Cheap: tensors are memory-mapped,
    not read. Raises :class:`UnsafeCheckpointError` for a file that would run code: such a file is
    refused, not passed over. A folder (what DeepSpeed writes in place of a file) counts when it
    holds DeepSpeed's ``latest`` tag file."""
    path = Path(path)
    if path.is_dir():
        return None if (path / "latest").is_file() else f"{path}: a folder without DeepSpeed's 'latest' file"
    try:
        load_checkpoint_file(path, mmap=True)
    except UnsafeCheckpointError:
        raise
    except (UnreadableCheckpointError, OSError) as err:
        return str(err)
    return None


def newest_readable_checkpoint(paths: Iterable[str | os.PathLike]) -> Path | None:
    """The most recently written checkpoint among ``paths`` that loads; each newer one that does not
    is logged with a warning and passed over. Hidden files (``.x.ckpt.partial``) are ignored."""
    files = {Path(p) for p in paths}
    files = [p for p in files if p.exists() and not p.name.startswith(".")]
    for path in sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("passing over a damaged checkpoint: %s", problem)
    return None


def checkpoints_in(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
