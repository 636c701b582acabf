"""Writing files so that nothing of the user's is lost: every file minicat writes goes through here.

- `write_atomic`: write beside the real name, then `os.replace` it into place. Readers see the old
  file or the whole new one; a full disk or a kill leaves no half file under a real name (the POSIX
  rename guarantee, rename(2)).
- `write_new`: the same, but never replaces a file that exists (a hard link, link(2), fails if the
  name is taken), for outputs the user names.
- `move_aside`: what a run no longer uses is renamed `<name>.<why>-<time>` beside itself, never
  deleted.
- `file_digest`: the sha256 that checkpoint manifests record and verify.
- `stale_temporaries`: the `<name>.tmp-<pid>` leftovers of processes that are gone (kill -9).

Imports no project file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

# This machine, in temporaries' names (no '/' in a file name).
HOST = socket.gethostname().replace("/", "_")


class WriteError(ValueError):
    """A file could not be written; the message names it and says what to do."""


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is moved into place: the same folder, so the rename is
    atomic; the machine and the process in the name, so a leftover can be proven stale."""
    return path.with_name(f"{path.name}.tmp-{HOST}-{os.getpid()}")


def _discard(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, write: Callable[[Path], None], what: str = "") -> None:
    """write(tmp) next to `path`, then move it into place (a file or a folder). A failed write (disk
    full, permissions) leaves nothing behind and ends in one line naming the path."""
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    # SafetensorError: safetensors' own writer reports a full disk this way
    except (OSError, SafetensorError) as e:
        _discard(tmp)
        why = getattr(e, "strerror", None) or e
        raise WriteError(
            f"{path}: cannot write {what}({why}); free disk space or fix permissions"
        ) from None


def write_new(path: Path, write: Callable[[Path], None], what: str = "") -> None:
    """write(tmp) next to `path`, then link it to `path`: raises FileExistsError, and leaves the
    file there untouched, if `path` exists (also when it appeared while we were writing)."""
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.link(tmp, path)
    except FileExistsError:
        raise
    except (OSError, SafetensorError) as e:
        why = getattr(e, "strerror", None) or e
        raise WriteError(
            f"{path}: cannot write {what}({why}); free disk space or fix permissions"
        ) from None
    finally:
        _discard(tmp)


def move_aside(paths: list[Path], why: str) -> list[Path]:
    """Rename each to `<name>.<why>-<time>` beside it: out of the way, and kept. Returns the new
    names."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for p in paths:
        target = p.with_name(f"{p.name}.{why}-{stamp}")
        n = 1
        while target.exists():  # two moves within a second
            n += 1
            target = p.with_name(f"{p.name}.{why}-{stamp}-{n}")
        p.rename(target)
        moved.append(target)
    return moved


def file_digest(path: Path) -> str:
    """The file's sha256, read in 16 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (kill(pid, 0) checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


TEMPORARY = re.compile(r"^(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")


def stale_temporaries(folder: Path) -> list[Path]:
    """`<name>.tmp-<pid>` files and folders in `folder` (not below it) whose process is gone: the
    leftovers of a killed writer. A live process's temporaries, and every other name, are left out.
    """
    if not folder.is_dir():
        return []
    stale = []
    for p in sorted(folder.iterdir()):
        m = TEMPORARY.match(p.name)
        ours = m is not None and m["host"] == HOST and int(m["pid"]) != os.getpid()
        if ours and not pid_alive(int(m["pid"])):
            stale.append(p)
    return stale


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove what `stale_temporaries` finds (only our own naming pattern, only dead writers)."""
    found = stale_temporaries(folder)
    for p in found:
        _discard(p)
    return found
