"""Writing files so that nothing a user made is lost: every write goes to a temporary name beside the target,
is flushed to disk and renamed over it (``atomic_write``), so a crash at any moment leaves the old file or the
new one, never a torn one. The temporary file is removed on any error, and operating-system errors (a full
disk, no permission, a read-only file system) become one clear ``DifflabError`` naming the file.
Temporary files of killed processes (``.NAME.tmpPID`` whose process is gone) are removed by ``remove_stale``.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Callable

from difflab.errors import DifflabError

TMP_PATTERN = re.compile(r"^\..+\.tmp(\d+)$")


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def os_error(path: Path, error: OSError) -> DifflabError:
    reason = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied", errno.EROFS:
              "read-only file system", errno.EDQUOT: "disk quota exceeded"}.get(error.errno, error.strerror or str(error))
    return DifflabError(f"cannot write {path}: {reason}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary name beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise os_error(path, e) from None
    except Exception as e:                           # libraries wrap OS errors (safetensors' SafetensorError)
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError) or "No space left" in str(e):
            raise os_error(path, cause if isinstance(cause, OSError) else OSError(errno.ENOSPC, str(e))) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a log record); an OS error becomes a clear ``DifflabError``."""
    try:
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError as e:
        raise os_error(Path(path), e) from None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                          # someone else's process
        return True
    return True


def remove_stale(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed processes left in ``folder``; returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = TMP_PATTERN.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
