"""What the terminal shows while training: the bar moves inside a long step (micro-batches done), and log lines,
metric lines and warnings are written above the bar, each on a line of its own, never into it."""

from __future__ import annotations

import logging
import re
import warnings

from sftune import SFTConfig
from sftune.logs import setup_logging
from sftune.training.report import Reporter


def segments(text: str) -> list[str]:
    """What a terminal ends up showing on each line: the text after each carriage return or newline."""
    return [part for part in re.split(r"[\r\n]", text) if part.strip()]


def test_lines_go_above_the_bar_and_the_bar_moves_within_a_step(tmp_path, capsys):
    setup_logging()
    reporter = Reporter(SFTConfig(output_dir=str(tmp_path)), tmp_path, total_steps=4, enabled=True)
    try:
        reporter.step(2.5, 1e-3, 1000.0)
        reporter.micro_batch_done(3, 8)
        logging.getLogger("sftune").warning("a log line")
        warnings.warn("a python warning", UserWarning, stacklevel=1)
        reporter.log({"step": 1, "loss": 2.5})
    finally:
        reporter.close()
    err = capsys.readouterr().err
    shown = segments(err)
    assert any("step 2: micro-batch 3/8" in part and part.startswith("train:") for part in shown)
    for line in ("[sftune] a log line", "UserWarning: a python warning", "step=1 loss=2.5000"):
        parts = [part for part in shown if line in part]
        assert parts, (line, err)
        assert not [part for part in parts if "train:" in part], parts  # a line of its own, not inside the bar


def test_a_step_of_one_micro_batch_shows_no_inner_progress(tmp_path, capsys):
    reporter = Reporter(SFTConfig(output_dir=str(tmp_path)), tmp_path, total_steps=2, enabled=True)
    reporter.micro_batch_done(1, 1)
    reporter.close()
    assert "micro-batch" not in capsys.readouterr().err
