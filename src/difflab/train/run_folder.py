"""A run folder that never loses work: an occupied folder is refused unless the run resumes it or is told to
overwrite it, and a lock file holding the PID keeps two trainings out of one folder (a lock whose process is
gone is stale and taken over). Temporary files of killed writes are removed when a run starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from difflab.errors import DifflabError
from difflab.files import process_alive, remove_stale

LOCK_NAME = ".lock"


def check_occupied(out_dir: Path, checkpoint_name: str, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run where a checkpoint already is, unless resuming it or told to overwrite it."""
    checkpoint = out_dir / checkpoint_name
    if checkpoint.exists() and not resume and not overwrite:
        raise DifflabError(f"{out_dir} already holds a run ({checkpoint}); continue it with --resume, or replace "
                           f"it with --overwrite, or choose another train.out_dir")


class RunLock:
    """``out_dir/.lock`` created exclusively with this process's PID, removed by ``release``."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.path.parent)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self.owner()
                if pid is not None and pid != os.getpid() and process_alive(pid):
                    raise DifflabError(f"{self.path.parent} is in use by another training (PID {pid}); wait for "
                                       f"it, or remove {self.path} if that process is not a difflab run") from None
                self.path.unlink(missing_ok=True)       # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise DifflabError(f"could not take the lock {self.path}")

    def owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held and self.owner() == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
