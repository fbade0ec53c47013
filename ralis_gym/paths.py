"""Where data and caches live.

Data root precedence: explicit ``data_root`` argument > ``RALIS_GYM_DATA`` environment variable >
per-user cache folder (``$XDG_CACHE_HOME/ralis-gym/data``, default ``~/.cache/ralis-gym/data``).
The data root holds one sub-folder per dataset (``camvid/``, ``cityscapes/``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "RALIS_GYM_DATA"
CACHE_ENV = "RALIS_GYM_CACHE"


def user_cache_dir() -> Path:
    """Root of everything ralis-gym caches (decoded arrays, features, start networks)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ralis-gym"


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """Return the data root following the documented precedence (the folder may not exist yet)."""
    if data_root is not None:
        return Path(data_root).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return user_cache_dir() / "data"
