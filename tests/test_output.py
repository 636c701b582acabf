"""Where training writes: nothing of the user's is lost, overwritten or silently cut. Each fault is
made to happen on the tiny model: an output_dir in a dataset, starting over in a folder with history,
changed data on resume, foreign folders among the checkpoints, a checkpoint past max_train_steps,
leftovers of killed runs, offload with an 8-bit base."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import EXAMPLES, fails, lora_of, losses, same_lora, write_config

import files
import train


def copy_pairs(folder: Path, names=None) -> Path:
    """A copy of the example pairs (all, or those named) that a test may change."""
    for role in ("edit", "ref"):
        (folder / role).mkdir(parents=True)
        for p in (EXAMPLES / role).iterdir():
            if names is None or p.stem in names:
                shutil.copy(p, folder / role / p.name)
    return folder


def test_an_output_dir_inside_a_dataset_is_refused_before_any_work(tiny_edit, tmp_path):
    pairs = copy_pairs(tmp_path / "pairs")
    before = sorted(p.name for p in (pairs / "edit").iterdir())
    cfg = write_config(tmp_path, tiny_edit, pairs=pairs, output_dir=str(pairs / "edit" / "out"))
    message = fails([cfg])
    assert "output_dir" in message and str(pairs / "edit") in message, message
    assert "dataset 'edit' instance_data_dir" in message and "\n" not in message, message
    assert sorted(p.name for p in (pairs / "edit").iterdir()) == before  # nothing written there


def test_an_output_dir_holding_a_cache_folder_is_refused(tiny_edit, tmp_path):
    # write_config puts the caches in tmp_path/cache: an output_dir of tmp_path holds them
    cfg = write_config(tmp_path, tiny_edit, output_dir=str(tmp_path))
    message = fails([cfg])
    assert "holds the folder of dataset 'edit' cache_dir_vae" in message, message


def test_starting_over_keeps_the_earlier_runs_grids_log_and_checkpoints(tiny_edit, tmp_path):
    keys = dict(
        max_train_steps=4,
        checkpointing_steps=2,
        validation_steps=2,
        validation_num_inference_steps=2,
        validation_resolution="64x64",
    )
    cfg = write_config(tmp_path, tiny_edit, **keys)
    train.main([cfg])
    out = tmp_path / "out"
    first = {p.name: p.read_bytes() for p in (out / "validation").iterdir()}
    first_config = (out / "config.json").read_text()
    train.main([cfg, "--resume_from_checkpoint=none", "--max_train_steps=2"])
    (aside,) = out.glob("superseded-*")
    # the first run's grids, checkpoints, log and config, as they were
    assert {p.name: p.read_bytes() for p in (aside / "validation").iterdir()} == first
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]
    assert [r["step"] for r in losses(aside)] == [1, 2, 3, 4]
    assert (aside / "config.json").read_text() == first_config
    assert (aside / "run.json").exists() and (aside / "loss.png").exists()
    # the new run's own files: 2 steps, grids 0 and 2 (none left over from the first run)
    assert [r["step"] for r in losses(out)] == [1, 2]
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        "step-000000.png",
        "step-000002.png",
    ]
    assert json.loads((out / "config.json").read_text())["max_train_steps"] == 2


def test_a_resume_over_changed_data_stops_naming_the_change(tiny_edit, tmp_path):
    pairs = copy_pairs(tmp_path / "pairs")
    cfg = write_config(tmp_path, tiny_edit, pairs=pairs, max_train_steps=2, checkpointing_steps=2)
    train.main([cfg])
    lora_before = lora_of(tmp_path / "out")
    for role in ("edit", "ref"):
        (pairs / role / "sun.png").unlink()
    (pairs / "edit" / "sun.txt").unlink()
    (pairs / "edit" / "circle.txt").write_text("make the circle green\n")
    message = fails([cfg, "--max_train_steps=4"])
    assert "dataset 'edit': 1 pair(s) removed (sun); 1 pair(s) changed (circle)" in message, message
    assert "resume_with_changed_data = true" in message and "\n" not in message, message
    assert same_lora(lora_of(tmp_path / "out"), lora_before)  # nothing trained, nothing written
    # going on on purpose is one key, and it is recorded
    train.main([cfg, "--max_train_steps=4", "--resume_with_changed_data=true"])
    record = json.loads((tmp_path / "out/data.json").read_text())
    assert record["changes"][0]["at_step"] == 2, record["changes"]
    assert "1 pair(s) removed (sun)" in record["changes"][0]["changes"][0]
    assert "sun" not in record["pairs"]["edit"] and len(record["pairs"]["edit"]) == 5


def test_rotation_removes_only_this_runs_verified_checkpoints(tiny_edit, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=2, checkpointing_steps=2)
    train.main([cfg])
    foreign = tmp_path / "out/checkpoints/step-000001"  # put there by hand: not this run's
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    train.main([cfg, "--max_train_steps=6", "--checkpoints_total_limit=1"])
    kept = sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir())
    assert kept == ["step-000001", "step-000006"], kept
    assert (foreign / "notes.txt").read_text() == "mine"
    assert f"{foreign} is not a verified checkpoint of this run" in capsys.readouterr().out


def test_a_checkpoint_past_max_train_steps_is_not_handed_back(tiny_edit, tmp_path):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=4, checkpointing_steps=4)
    train.main([cfg])
    shared = (tmp_path / "out/pytorch_lora_weights.safetensors").read_bytes()
    message = fails([cfg, "--max_train_steps=3"])
    assert "max_train_steps = 3, but" in message and "step-000004 is at step 4" in message, message
    assert (tmp_path / "out/pytorch_lora_weights.safetensors").read_bytes() == shared
    # asked to start over from step 0, it trains 3 steps and keeps the longer run aside
    train.main([cfg, "--max_train_steps=3", "--resume_from_checkpoint=none"])
    assert [r["step"] for r in losses(tmp_path / "out")] == [1, 2, 3]
    assert len(list((tmp_path / "out").glob("superseded-*/checkpoints/step-000004"))) == 1


def test_leftovers_of_killed_runs_are_removed_and_nothing_else(tiny_edit, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    dead = 2**22 + 12345  # above Linux's default pid_max (2^22): no process has it
    assert not files.pid_alive(dead)
    stale = [
        out / f"loss.png.tmp-{files.HOST}-{dead}",
        out / "checkpoints" / f"step-000009.tmp-{files.HOST}-{dead}",
    ]
    stale[0].write_bytes(b"half a png")
    stale[1].mkdir()
    keep = [
        out / f"loss.jsonl.tmp-{files.HOST}-{os.getppid()}",  # a live process's (pytest's parent)
        out / f"run.json.tmp-otherhost-{dead}",  # another machine's, on a shared disk
        out / "notes.tmp-1",  # not our pattern
    ]
    for p in keep:
        p.write_text("keep me")
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=1, checkpointing_steps=1)
    train.main([cfg])
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "keep me" for p in keep)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_offload_trains_an_8bit_base_as_without_offload(tiny_edit, tmp_path, precision):
    """It crashed in `.to()` on a block whose weight was offloaded (quant.py's _apply)."""
    common = dict(base_model_precision=precision, max_train_steps=2, checkpointing_steps=2)
    train.main([write_config(tmp_path / "a", tiny_edit, **common)])
    train.main([write_config(tmp_path / "b", tiny_edit, offload_blocks=2, **common)])
    assert same_lora(lora_of(tmp_path / "a/out"), lora_of(tmp_path / "b/out"))


def test_an_offload_count_past_the_blocks_is_one_line(tiny_edit, tmp_path):
    cfg = write_config(tmp_path, tiny_edit)
    proc = subprocess.run(
        [sys.executable, str(Path(train.__file__)), cfg, "--offload_blocks=99"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "offload_blocks = 99: the transformer has" in proc.stderr, proc.stderr
