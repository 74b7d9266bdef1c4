"""Writing files without losing any: atomic replacement, one-writer locks, stale temp files, up-front checks;
and reading torch files a user names, with an error that says what the file is instead of torch's own.

Every file the tool writes goes through `atomic_write`: a hidden temp file in the same folder, fsync, then
`os.replace`. An interrupt or a write error (disk full, EFBIG) removes the temp file and leaves the old
file as it was; a `kill -9` can leave one behind, named `.NAME.tmp-PID`, which `remove_stale_temps`
deletes on the next run once PID is no longer alive.

`exclusive` is an advisory lock (`fcntl.flock`, so the kernel releases it when the process dies, however it
dies: a lock is never stale) on a hidden `.NAME.lock` file next to what it protects. The holder's pid is
written in it for the message the second command gets. Written by hand rather than with `filelock`
because that library does not record the holder, and the message must name it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline.errors import UserError, describe

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are then not protected against a second writer
    fcntl = None  # type: ignore[assignment]


def temp_path(path: Path) -> Path:
    """The hidden temp file that `atomic_write` builds `path` in (pid-tagged, same folder, same filesystem)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(path: Path, locked: bool = False) -> list[Path]:
    """Delete `.NAME.tmp-PID` files next to `path` whose process is gone (left by a kill -9). Returns them.
    `locked`: the caller holds `exclusive(path)`, so no other process can be writing one, whatever its pid
    (pids are reused: a temp file whose pid now names an unrelated live process is stale too)."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)$")
    folder = path.parent
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and (locked or not _alive(int(m.group(1)))):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`with atomic_write(p) as f: f.write(...)`: the file at `p` is replaced only once everything was written
    and synced. On any exception, Ctrl-C included, the temp file is removed and `p` is untouched. An OSError
    while writing becomes a UserError `cannot write PATH: ...`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {describe(e)}") from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


_held: dict[tuple[int, str], int] = {}  # (pid, lock file) -> depth, for the locks this process holds


def lock_path(path: Path) -> Path:
    """The lock file that guards `path` (a file or a folder). Chosen by what `path` is now: lock a folder only
    once it exists (`check_writable_folder` creates it). A folder created inside the lock would be guarded
    by `.NAME.lock` for the first holder and by `NAME/.lock` for the next one: two writers."""
    return path / ".lock" if path.is_dir() else path.with_name(f".{path.name}.lock")


def lock_holder(path: str | Path) -> int | None:
    """The pid recorded in the lock of `path` when that process is alive, else None. For messages only: it
    does not test the lock itself (a reader must never take it)."""
    try:
        text = lock_path(Path(path)).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and _alive(int(text)) else None


@contextlib.contextmanager
def exclusive(path: str | Path, what: str | None = None) -> Iterator[None]:
    """Hold the one-writer lock on `path` (a store file, or a run folder) for the duration of the block.
    A second holder gets `UserError: WHAT is in use by another process (pid N)` at once, never a wait.
    The lock file is removed on the way out; one left by a killed process is not locked and is reused.

    Re-entrant within a process (the demo holds its folder while fit, inside it, takes the same one).
    Create a folder before locking it: the lock of a folder is inside it (`DIR/.lock`), the lock of a path
    that does not exist yet is next to it."""
    path = Path(path)
    if fcntl is None:
        yield
        return
    lock = lock_path(path)
    _refuse_foreign_lock(lock)
    key = (os.getpid(), str(lock.resolve()))
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write {lock.parent}: {describe(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                pid = f" (pid {holder})" if holder.isdigit() else ""
                raise UserError(f"{what or path} is in use by another process{pid}; wait for it to finish") from None
            raise UserError(f"cannot lock {lock}: {describe(e)}") from None
        # The previous holder may have unlinked the file between our open and our flock: lock the live one.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _held[key] = 1
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            lock.unlink()  # while still locked: whoever opens it next creates a fresh one
        os.close(fd)


def _refuse_foreign_lock(lock: Path) -> None:
    """A lock file of ours holds a pid (or nothing, when its writer was killed at once). Anything else at that
    name (another tool's `.lock` in a user's folder, a link, a folder) is not ours to truncate and delete."""
    try:
        if lock.is_symlink() or not lock.is_file():
            content = b"" if not (lock.exists() or lock.is_symlink()) else b"not a file"
        else:
            with open(lock, "rb") as f:
                content = f.read(64).strip()
    except OSError:
        return  # unreadable: os.open below says why
    if content and not content.isdigit():
        raise UserError(
            f"{lock} exists and is not a lock file of captioner (it holds something else): it is left as it is; "
            "move it, or choose another folder"
        )


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """Create `folder` (and parents) if needed and prove a file can be written in it, before any work starts.
    A path that is a file, or a folder without write permission, is a UserError naming `what`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write in {what} {folder}: {describe(e)}") from None
    return folder


# First bytes of files a user may give where a torch file is expected, and what to call them.
_MAGIC = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a feature store?)"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a WebP image or another RIFF file"),
    (b"\x1f\x8b", "a gzip file"),
    (b"%PDF", "a PDF document"),
)


def what_file(path: Path) -> str:
    """What a file is, in a few words, from its first bytes: "an empty file", "an HDF5 file (a feature store?)",
    "a zip archive", "a pickle", "a text file"..."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"unreadable ({describe(e)})"
    if not head:
        return "an empty file"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle"
    for cut in range(4):  # the 512 bytes may end inside a character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if all(c.isprintable() or c in "\t\r\n" for c in text):
            return "a text file"
    return "a file of another kind"


def read_torch(path: Path, what: str, expected: str) -> object:
    """`torch.load(path, weights_only=True)` on CPU (nothing in the file is ever run). A file it cannot load is a
    UserError `cannot load WHAT PATH: it is ..., not EXPECTED` ("checkpoint", "a checkpoint written by fit"),
    saying what the file is: never torch's message, which tells programmers to retry with
    `weights_only=False` (that runs the file's code)."""
    import torch

    try:
        with warnings.catch_warnings():  # torch's warnings about a pickle's protocol ask to "file an issue"
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, EOF and weights_only errors alike: the file is not what was expected
        kind, why = what_file(path), ""
        if kind in ("a zip archive", "a pickle"):  # torch's own formats
            if isinstance(e, pickle.UnpicklingError):
                kind = "a file of Python objects other than tensors and plain values (a whole pickled model?)"
                why = ": such objects are never loaded, since loading them could run code"
            else:
                kind = f"{kind} that is damaged, truncated or not a PyTorch file"
        raise UserError(f"cannot load {what} {path}: it is {kind}, not {expected}{why}") from None
