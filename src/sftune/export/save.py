"""Write the trained model and tokenizer so that transformers loads them as-is. Files land atomically."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def staged_into(target: Path) -> Iterator[Path]:
    """Yield a fresh staging folder inside `target`; on success move each file into place with an atomic rename.

    A crash before the end leaves `target` as it was (plus a hidden staging folder), never a half-written file.
    """
    stage = target / f".staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        yield stage
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                destination = target / path.relative_to(stage)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_model(model: Any, tokenizer: Any, output_dir: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Weights as safetensors, config, generation config, and the tokenizer with its chat template.

    `state_dict` gives the full weights when the model in memory is sharded (FSDP, DeepSpeed ZeRO-3).
    """
    with staged_into(output_dir) as stage:
        # save_pretrained empties a state_dict it is given (transformers 5), so it gets a copy
        model.save_pretrained(stage, **({"state_dict": dict(state_dict)} if state_dict is not None else {}))
        tokenizer.save_pretrained(stage)
