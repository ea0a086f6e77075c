"""Resume is the same run: settings that change training are the checkpoint's, or the resume is refused."""

from __future__ import annotations

import json

from sftune.cli import main


def test_resume_refuses_settings_that_change_training_and_allows_safe_ones_on_request(tiny_model_dir, chat_jsonl,
                                                                                      tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(chat_jsonl),
            "--output_dir", str(out), "--save_steps", "1", "--max_length", "64"]
    assert main(argv + ["--max_steps", "2"]) == 0
    resume = argv + ["--resume_from_checkpoint", "true"]
    capsys.readouterr()

    # a new learning rate and data settings would mix two runs: refused, every difference listed, nothing written
    before = sorted(p.name for p in out.iterdir())
    assert main(resume + ["--max_steps", "2", "--learning_rate", "1e-3", "--max_length", "48"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 2e-05 -> 0.001" in err and "max_length: 64 -> 48" in err and "start a new run" in err
    assert sorted(p.name for p in out.iterdir()) == before

    # more steps are safe, but only when asked for
    assert main(resume + ["--max_steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "max_steps: 2 -> 3" in err and "resume_allow_changes: true" in err
    assert main(resume + ["--max_steps", "3", "--resume_allow_changes"]) == 0
    err = capsys.readouterr().err
    assert "resuming with max_steps changed from 2 to 3" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3

    # even when asked for, a change to training is refused
    assert main(resume + ["--max_steps", "3", "--resume_allow_changes", "--weight_decay", "0.1"]) == 2
    assert "weight_decay: 0.0 -> 0.1" in capsys.readouterr().err
