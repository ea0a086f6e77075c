"""Ctrl-C (SIGINT) and SIGTERM while training: the first asks the loop to stop at the next micro-batch boundary
with a checkpoint of the last completed step; the second stops at once, without saving, which leaves the last
checkpoint as it was.

Python runs a signal handler only in the main thread between two bytecodes, so while one long torch operation
runs (a backward pass of tens of seconds on a slow CPU), signals wait, and two of them arrive as one. The C-level
handler, though, writes every signal's number to the wakeup file descriptor the moment it comes; a watcher thread
reads them there one by one, so the first is seen at once and the second can end the process at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("sftune")

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Builds the command that continues a run, given its output_dir; the CLI sets it to the command the user typed.
_resume_command: Callable[[Path], str] | None = None


def set_resume_command(build: Callable[[Path], str] | None) -> None:
    global _resume_command
    _resume_command = build


def resume_hint(output_dir: Path) -> str:
    """What continues this run: the exact command under the CLI, the config key from Python."""
    if _resume_command is not None:
        return f"continue with: {_resume_command(output_dir)}"
    return "continue with resume_from_checkpoint: true"


class StopSignals:
    """While active, counts SIGINT / SIGTERM as they arrive: `requested` after the first, an exit after the second.

    `describe_last_checkpoint()` says, at the moment of a second signal, which checkpoint is left to resume from.
    Outside the main thread (where signals cannot be caught) it does nothing and training stops only if killed.
    """

    def __init__(self, output_dir: Path, describe_last_checkpoint: Callable[[], str]):
        self.output_dir = output_dir
        self.describe_last_checkpoint = describe_last_checkpoint
        self.requested = threading.Event()
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._pipe = (read_end, write_end)
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, _ignore_in_python)  # the watcher does the work
        self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(read_end,), name="sftune-signals", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        read_end, write_end = self._pipe
        os.close(write_end)  # the watcher reads the end of the pipe and returns
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        os.close(read_end)
        self._pipe = None

    def _watch(self, read_end: int) -> None:
        while True:
            try:
                received = os.read(read_end, 64)
            except OSError:
                return
            if not received:
                return
            for signum in received:
                if signum not in SIGNALS:
                    continue
                if not self.requested.is_set():
                    self.signal_number = signum
                    self.requested.set()
                    log.warning("%s: stopping at the end of this micro-batch with a checkpoint of the last completed "
                                "step; press Ctrl-C again to stop at once without saving", signal.Signals(signum).name)
                else:
                    self._exit_now(signum)

    def _exit_now(self, signum: int) -> None:
        try:
            last = self.describe_last_checkpoint()
        except Exception:  # noqa: BLE001 - whatever happens, the process ends now
            last = "the checkpoints saved so far are intact"
        sys.stderr.write(f"\nsftune: stopped at once by a second {signal.Signals(signum).name}, without saving; "
                         f"{last}; {resume_hint(self.output_dir)}\n")
        sys.stderr.flush()
        os._exit(128 + signum)


def _ignore_in_python(signum: int, frame: Any) -> None:
    """The Python-level handler: nothing to do, the watcher thread has already seen the signal."""
