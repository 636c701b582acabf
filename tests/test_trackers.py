"""Trackers (issue 21, item 5) as a specification: report_to = "tensorboard" writes the loss, the
learning rate, the gradient norm and the validation grids as event files (read back with
tensorboard's own EventAccumulator), loss.jsonl and loss.png stay, a missing package is one line with
the pip command, and "none" writes nothing."""

import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import EXAMPLES, fails, losses, write_config

import train


def test_tensorboard_event_files_hold_what_loss_jsonl_holds_and_the_grids(tiny_edit, tmp_path):
    """Per step: train/loss, train/lr, train/grad_norm equal loss.jsonl's rows (as float32, what
    an event holds); one validation image per validation (steps 0, 2, 3). Catches: a value logged
    under another step, a scalar missing, images not sent."""
    cfg = write_config(
        tmp_path,
        tiny_edit,
        max_train_steps=3,
        validation_steps=2,
        validation_num_inference_steps=1,
        validation_resolution="64x64",
        validation_prompt="add a sun",
        validation_reference=str(EXAMPLES / "ref/sun.png"),
        report_to="tensorboard",
        tracker_project_name="proj",
        tracker_run_name="first",
    )
    train.main([cfg])
    out = tmp_path / "out"
    events = EventAccumulator(str(out / "logs/proj/first"), size_guidance={"images": 0})
    events.Reload()
    rows = losses(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        want = [(r["step"], float(np.float32(r[key]))) for r in rows]
        assert got == want, (key, got, want)
    shots = events.Images("validation")
    assert [e.step for e in shots] == [0, 2, 3], [e.step for e in shots]
    assert (out / "loss.png").exists() and (out / "loss.jsonl").exists()


def test_report_to_none_writes_no_tracker_files(tiny_edit, tmp_path):
    """The default. Catches: a tracker started without being asked."""
    train.main([write_config(tmp_path, tiny_edit, max_train_steps=1, checkpointing_steps=1)])
    assert not (tmp_path / "out/logs").exists()
    assert "wandb" not in sys.modules


@pytest.mark.parametrize(
    "tracker, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")]
)
def test_a_missing_tracker_package_is_one_line_with_the_pip_command(
    tiny_edit, tmp_path, monkeypatch, tracker, module
):
    """Catches: an ImportError traceback, or training on without the tracker asked for."""
    monkeypatch.setitem(sys.modules, module, None)  # `import` of it raises ImportError
    message = fails(
        [write_config(tmp_path, tiny_edit, max_train_steps=1), f"--report_to={tracker}"]
    )
    assert f"needs its package: pip install {tracker}" in message, message
    assert not (tmp_path / "out/checkpoints").exists()


def test_an_unknown_tracker_is_named(tiny_edit, tmp_path):
    message = fails([write_config(tmp_path, tiny_edit), "--report_to=comet"])
    assert "report_to = 'comet': choose one of none, tensorboard, wandb" in message, message
