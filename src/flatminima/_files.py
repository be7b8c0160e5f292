"""Files the experiment runner writes and reads: atomic writes, the output folder's lock and
checkpoints that are checked before use.

Every output file (records, tables, figures, the report, checkpoints) is written to a temporary
file in the same folder, flushed to disk, then renamed over the target with :func:`os.replace`. A
kill mid-write leaves the old file or the new one, never a truncated one; a failed write removes
its temporary file; a symlink at the target is replaced by the file, never written through.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch

from .core.validation import check

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: an O_EXCL lock file instead
    fcntl = None

PathLike = Union[str, os.PathLike]


#: Temporary files of :func:`atomic_path`: ``.<name>.<random>.tmp[<suffix>]``.
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp(\.\w+)?")


@contextlib.contextmanager
def atomic_path(path: PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is fsynced and renamed
    to ``path``, when it raises (KeyboardInterrupt included) it is removed. ``keep_suffix``: the
    temporary name ends with ``path``'s suffix, for writers that pick the format from the name
    (``savefig``); otherwise it ends with ``.tmp``, so no glob for the real files matches it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + (path.suffix if keep_suffix else "")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the user's group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: PathLike, value: Any, indent: Union[int, None] = None) -> Path:
    """Write ``value`` as JSON atomically (the text is built before the file is touched)."""
    return write_text(path, json.dumps(value, indent=indent))


def save_torch(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically: a killed run never leaves a truncated checkpoint."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(path)


def load_state_dict(path: PathLike, map_location: Any = "cpu", what: str = "checkpoint") -> dict:
    """A state dict saved by ``torch.save`` (loaded with ``weights_only=True``: no code runs).
    ``ValueError`` naming ``what`` and the file when it is missing, empty, unreadable or not a
    mapping of names to tensors."""
    path = Path(path)
    expected = "a state dict saved by torch.save (`flatminima run --save-models` writes runs/UNIT.pt)"
    check(what, path.is_file(), str(path), f"{expected}; it is not a file")
    check(what, path.stat().st_size > 0, str(path), f"{expected}; the file is empty")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the file is unusable
        raise ValueError(f"Invalid {what}: {str(path)!r} (expected {expected}; it does not load: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    check(what, isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()),
          str(path), f"{expected}; it holds a {type(state).__name__}, not names mapped to tensors")
    return state


def prepare_out(out: PathLike) -> Path:
    """Create the output folder and check it is writable; ``ValueError`` naming ``out_dir`` (the
    config field ``--out`` sets) otherwise, before anything trains."""
    out = Path(out)
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ValueError(f"Invalid out_dir: {str(out)!r} (expected a folder that can be created and written: "
                         f"{exc.strerror or exc})") from None
    return out


def remove_temporaries(folder: PathLike) -> list[Path]:
    """Remove what a killed writer left in ``folder`` and its direct sub-folders (``runs/``, ...):
    temporary files of :func:`atomic_path` (a SIGKILL between creating one and renaming it cannot
    be cleaned up by the dying process). Call it holding the folder's :class:`OutputLock`, so no
    writer is live."""
    folders = [Path(folder), *(p for p in Path(folder).iterdir() if p.is_dir() and not p.is_symlink())]
    stale = [p for f in folders for p in f.glob(".*.tmp*") if p.is_file() and _TEMPORARY.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class OutputLock:
    """An exclusive lock on an output folder for the length of a run (``<out>/.flatminima.lock``).

    ``fcntl.flock`` where available: the operating system releases it when the process ends, so
    a crashed or killed run never blocks the next one. A second run into the same folder is
    refused at once with ``ValueError`` naming the holder's pid.
    """

    NAME = ".flatminima.lock"

    def __init__(self, out: PathLike):
        self.path = Path(out) / self.NAME
        self._fd = None

    def _refuse(self, holder: str) -> None:
        raise ValueError(f"Invalid out_dir: {str(self.path.parent)!r} (another flatminima run, pid "
                         f"{holder or 'unknown'}, is writing there; wait for it to finish or choose another --out)")

    def __enter__(self) -> "OutputLock":
        if fcntl is None:  # pragma: no cover - a lock file removed on exit (a crash leaves it: remove it by hand)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._refuse(self.path.read_text(errors="replace").strip() + f"; remove {self.path} if it is gone")
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                self._refuse(holder)
            os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if fcntl is None:  # pragma: no cover
            os.close(fd)
            self.path.unlink(missing_ok=True)
        else:
            # The file stays: removing it would let a third run lock a new file while a second
            # one still waits on the old inode.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
