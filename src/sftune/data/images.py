"""The images of vision-language rows: references, checks, loading, and keeping them in the prepared-data cache.

A row refers to its images; pixels are made only when a batch is built (data/collate.py), so the cache holds
token ids, never pixels. A reference is one of:
- a file path (str): from a data file, relative paths are read from the data file's folder;
- image bytes (bytes): as a `datasets` Image column or a Hub dataset gives them;
- a PIL image: handed to the Python API.
Prepared data stored in the cache refers to files only: images that are not files are written into the cache
entry once (see `store_images`).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from sftune.errors import DataError

ImageRef = Any  # str (a file path) | bytes | PIL.Image.Image


def row_images(row: dict[str, Any], origin_file: str | None, where: str) -> list[ImageRef] | None:
    """The row's `images` (a list) or `image` (one), checked and resolved; None when the row has neither."""
    field = "images" if row.get("images") is not None else "image" if row.get("image") is not None else None
    if field is None:
        return None
    value = row[field]
    if field == "image" or isinstance(value, (str, bytes, dict)) or _is_pil(value):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be a list of image file paths, got {type(value).__name__}")
    return [check_image(item, origin_file, f"{where}: field '{field}' item {number}")
            for number, item in enumerate(value, start=1)]


def check_image(item: Any, origin_file: str | None, where: str) -> ImageRef:
    """One image reference, resolved (a path made absolute) and opened once to make sure it is an image."""
    if isinstance(item, dict):  # a `datasets` Image value: {"bytes": ..., "path": ...}
        item = item.get("bytes") or item.get("path")
    if isinstance(item, str):
        if item.startswith(("http://", "https://")):
            raise DataError(f"{where}: {item!r} is a URL; sftune does not download images: save them and give "
                            "file paths")
        path = Path(item).expanduser()
        if not path.is_absolute() and origin_file is not None and Path(origin_file).is_file():
            path = Path(origin_file).parent / path
        path = path.resolve()
        if not path.is_file():
            base = f" (relative paths are read from the data file's folder, {Path(origin_file).parent})" \
                if origin_file is not None and Path(origin_file).is_file() and not Path(item).is_absolute() else ""
            raise DataError(f"{where}: image file '{item}' does not exist{base}")
        _check_opens(path, where, f"'{item}'")
        return str(path)
    if isinstance(item, (bytes, bytearray)):
        _check_opens(io.BytesIO(item), where, "the bytes")
        return bytes(item)
    if _is_pil(item):
        return item
    raise DataError(f"{where}: expected an image file path, image bytes or a PIL image, got {type(item).__name__}")


def _check_opens(source: Any, where: str, what: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:  # reads the header only
            image.size  # noqa: B018
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{where}: {what} is not an image file PIL can read ({type(err).__name__})") from None


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "getbands")


def load_image(ref: ImageRef) -> Any:
    """The PIL image a reference stands for, decoded."""
    from PIL import Image

    if _is_pil(ref):
        return ref
    image = Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref)
    image.load()
    return image


# ---------------------------------------------------------------- the cache


def image_digest(ref: ImageRef) -> str:
    """A content hash for an image that is not a file (bytes or a PIL image)."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(ref, (bytes, bytearray)):
        digest.update(b"bytes\0" + bytes(ref))
    else:
        digest.update(f"pil\0{ref.mode}\0{ref.size}\0".encode() + ref.tobytes())
    return digest.hexdigest()


def fingerprint_default(value: Any) -> Any:
    """`json.dumps(default=...)` for rows handed to the Python API: images by content, not by object identity."""
    if _is_pil(value) or isinstance(value, (bytes, bytearray)):
        return "image:" + image_digest(value)
    return str(value)


def store_images(refs: list[ImageRef], stage: Path, final: Path) -> list[str]:
    """File paths for `refs`: files stay where they are; other images are written into `stage`/images (the cache
    entry being written, which becomes `final`), once per distinct image, and referred to at `final`/images."""
    paths = []
    for ref in refs:
        if isinstance(ref, str):
            paths.append(ref)
            continue
        name = image_digest(ref) + (".bin" if isinstance(ref, (bytes, bytearray)) else ".png")
        target = stage / "images" / name
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            if isinstance(ref, (bytes, bytearray)):
                target.write_bytes(bytes(ref))  # the original encoding, unchanged
            else:
                ref.save(target, format="PNG")  # lossless
        paths.append(str(final / "images" / name))
    return paths


def file_stamps(paths: list[str]) -> dict[str, list[int]]:
    """Size and modification time of each distinct file, to tell whether cached rows still match their images."""
    stamps = {}
    for path in dict.fromkeys(paths):
        try:
            stat = Path(path).stat()
        except OSError:
            stamps[path] = [-1, -1]
        else:
            stamps[path] = [stat.st_size, stat.st_mtime_ns]
    return stamps


# ---------------------------------------------------------------- processors


def processor_fingerprint(processor: Any) -> str:
    """Every processor setting that changes how many tokens an image becomes (the image processor's size, patch
    size, image token, ...); the tokenizer and chat template are fingerprinted with the tokenizer."""
    import json

    settings = processor.to_dict()
    settings.pop("chat_template", None)
    text = json.dumps({"class": type(processor).__name__, "settings": settings}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
