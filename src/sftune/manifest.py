"""A folder is complete only if its manifest says so: the names, sizes and checksums of its files, written last.

Checkpoints and data-cache entries are renamed into place only once written, but a disk can still lose or damage
files afterwards (a full disk during a copy, a sync tool, a crash of the machine before the data reached it).
Before a resume reads a checkpoint its files are checked against the manifest, so a damaged one is named and the
previous complete one offered instead of failing deep inside torch.load; a damaged cache entry is prepared again.

The check must stay cheap (a 7B model's checkpoint is 80 GB, and every process of a resume checks it): each file's
size, and a CRC-32 of its first and last MiB. That finds a missing, truncated or half-copied file and a damaged
header (where safetensors and torch keep their index); a byte flipped in the middle of a large file is not found.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

MANIFEST = "sftune_manifest.json"
_EDGE = 1 << 20  # bytes read at each end of a file


def checksum(path: Path) -> str:
    """CRC-32 of the first and last MiB (of every byte, for a file of 2 MiB or less)."""
    with path.open("rb") as handle:
        value = zlib.crc32(handle.read(_EDGE))
        size = handle.seek(0, 2)
        if size > _EDGE:
            handle.seek(max(_EDGE, size - _EDGE))
            value = zlib.crc32(handle.read(), value)
    return f"{value:08x}"


def write_manifest(folder: Path) -> None:
    """Record every file under `folder` (call it last, once everything else is written)."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": checksum(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def manifest_problem(folder: Path) -> str | None:
    """What is wrong with `folder` against its manifest (None: complete and intact)."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (it was not written to the end)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} cannot be read"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size:,} bytes, {expected['bytes']:,} when written"
        if checksum(path) != expected["crc32"]:
            return f"{name} differs from what was written (checksum)"
    return None
