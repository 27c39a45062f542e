"""Where qlib caches what it computes once per build (trained networks, runs, generated data), and
the fingerprint of its own code that keeps a cache from serving results of older code."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """Where trained networks, runs and generated data are cached: ``$QLIB_CACHE_DIR`` or
    ``~/.cache/qlib``."""
    return Path(os.environ.get("QLIB_CACHE_DIR") or Path.home() / ".cache" / "qlib")


def code_fingerprint(files=None) -> str:
    """A hash of qlib's source files (``files``: paths relative to the package; default every module
    but :mod:`qlib.plots`), so that a cached result is reused only by the code that computed it."""
    package = Path(__file__).resolve().parent
    if files is None:
        paths = sorted(p for p in package.rglob("*.py") if p.name != "plots.py")
    else:
        paths = sorted(package / f for f in files)
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
