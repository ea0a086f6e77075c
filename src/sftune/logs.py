"""sftune's log: `[sftune] ...` lines on stderr, written above the progress bar when one is shown, never into it.

Light on purpose (no torch, no transformers): the CLI sets it up before anything slow is imported.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("sftune")


class StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr, not the one at set-up (pytest and notebooks replace it), through tqdm, which
    clears a progress bar on that stream, writes the line, and draws the bar again below it."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    if not log.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("[sftune] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
