"""Where SparseFW keeps caches and offline assets (never inside the git checkout)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$SPARSEFW_CACHE`` if set, else ``~/.cache/sparsefw``. Created on demand."""
    p = Path(os.environ.get("SPARSEFW_CACHE") or Path.home() / ".cache" / "sparsefw")
    p.mkdir(parents=True, exist_ok=True)
    return p


def assets_dir() -> Path:
    """Offline assets installed by ``scripts/setup.sh`` (MNIST, Fashion-MNIST, Austen)."""
    return cache_dir() / "assets"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file beside it (named with this PID, so
    concurrent writers never share one), then a rename. Readers see the old or the new file,
    never half of one; the parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def claim(result_file: Path) -> Path | None:
    """Claim the job that writes ``result_file`` with an exclusive lock file ``<stem>.lock``.

    The lock holds this process's PID. Returns the lock path (delete it when the result is
    written), or ``None`` if a live process holds it; a lock left by a dead process (a crash) is
    taken over. Lets several processes share one resumable job list (``sparsefw compare`` cells,
    zero-shot shards), e.g. two single-thread workers on a 2-core machine.
    """
    lock = Path(result_file).with_suffix(".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return None                    # held by a live process
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)   # stale: its process is gone
                continue
            except PermissionError:
                return None
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return lock
    return None
