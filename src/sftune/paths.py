"""Where sftune keeps things between runs, and its own version: read by any module without importing the rest."""

from __future__ import annotations

import os
from pathlib import Path

VERSION = "0.1.0"


def cache_dir() -> Path:
    """The cache of fetched assets and prepared data: $SFTUNE_CACHE, by default ~/.cache/sftune."""
    return Path(os.environ.get("SFTUNE_CACHE", "~/.cache/sftune")).expanduser()
