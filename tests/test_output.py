"""Where training writes: nothing of the user's is lost, overwritten or silently cut. Each fault is
made to happen on the tiny model: an output_dir in a dataset, starting over in a folder with history,
changed data on resume, foreign folders among the checkpoints, a checkpoint past max_train_steps,
leftovers of killed runs, offload with an 8-bit base."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import Mock

import pytest
from test_train import EXAMPLES, fails, lora_of, losses, same_lora, write_config

import config
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


def test_starting_over_keeps_the_earlier_runs_grids_log_and_checkpoints(
    tiny_edit, tmp_path, monkeypatch
):
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
    # a restart that fails once it has set the first run aside (the tracker's package missing),
    # then one that works: one superseded folder, not a second copy of the history
    with monkeypatch.context() as m:
        m.setattr(train, "Tracker", Mock(side_effect=ValueError("report_to: no such package")))
        assert "no such package" in fails([cfg, "--resume_from_checkpoint=none"])
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
    """Step 8 saved; asked for 3 steps, or for 1 epoch (6 batches of the 6 example pairs), the run
    stops naming the key that ends it. Catches the epochs left out of the guard (the 8-step LoRA
    handed back for a 6-step config)."""
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=8, checkpointing_steps=8)
    train.main([cfg])
    shared = (tmp_path / "out/pytorch_lora_weights.safetensors").read_bytes()
    message = fails([cfg, "--max_train_steps=3"])
    assert "max_train_steps = 3 ends the run at step 3, but" in message, message
    assert "step-000008 is at step 8" in message, message
    message = fails([cfg, "--num_train_epochs=1"])
    assert "num_train_epochs = 1 (6 steps) ends the run at step 6, but" in message, message
    assert (tmp_path / "out/pytorch_lora_weights.safetensors").read_bytes() == shared
    # asked to start over from step 0, it trains 3 steps and keeps the longer run aside
    train.main([cfg, "--max_train_steps=3", "--resume_from_checkpoint=none"])
    assert [r["step"] for r in losses(tmp_path / "out")] == [1, 2, 3]
    assert len(list((tmp_path / "out").glob("superseded-*/checkpoints/step-000008"))) == 1


def test_leftovers_of_killed_runs_are_removed_and_nothing_else(tiny_edit, tmp_path):
    """In the output folder and the caches (a run killed while caching). Catches the caches left
    out, or another writer's temporaries removed."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    dead = 2**22 + 12345  # above Linux's default pid_max (2^22): no process has it
    assert not files.pid_alive(dead)
    stale = [
        out / f"loss.png.tmp-{files.HOST}-{dead}",
        out / "checkpoints" / f"step-000009.tmp-{files.HOST}-{dead}",
    ]
    (tmp_path / "cache/edit").mkdir(parents=True)
    stale.append(tmp_path / "cache/edit" / f"latent-0a1b.safetensors.tmp-{files.HOST}-{dead}")
    stale[0].write_bytes(b"half a png")
    stale[1].mkdir()
    stale[2].write_bytes(b"half a latent")
    keep = [
        out / f"loss.jsonl.tmp-{files.HOST}-{os.getppid()}",  # a live process's (pytest's parent)
        out / f"run.json.tmp-otherhost-{dead}",  # another machine's, on a shared disk
        out / "notes.tmp-1",  # not our pattern
        tmp_path / "cache/edit" / f"x.safetensors.tmp-{files.HOST}-{os.getppid()}",  # a live run's
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


def test_a_loss_line_cut_short_is_dropped_before_the_run_goes_on(tmp_path):
    """A full disk cut step 3's line; the run resumes at step 2 and logs step 3 again. Catches the
    torn line kept (two rows had been read, as many as the step): step 3 is appended to it and the
    new row is lost too."""
    path = tmp_path / "loss.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
    log = train.LossLog(path, 2)
    log.add({"step": 3, "loss": 0.125})
    assert [r["loss"] for r in train.LossLog.read(path)] == [0.5, 0.25, 0.125]


def test_a_run_killed_before_sharing_its_last_checkpoint_shares_it_when_run_again(
    tiny_edit, tmp_path
):
    """A kill between the step-4 checkpoint and the refresh of output_dir's LoRA and loss.png (made
    to happen: the step-2 file put back, loss.png removed). Run again, with nothing left to train,
    it shares step 4. Catches the stale step-2 LoRA handed back as "step 4"."""
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=4, checkpointing_steps=2)
    train.main([cfg])
    out = tmp_path / "out"
    name = "pytorch_lora_weights.safetensors"
    shutil.copyfile(out / "checkpoints/step-000002" / name, out / name)
    (out / "loss.png").unlink()
    train.main([cfg])
    assert (out / name).read_bytes() == (out / "checkpoints/step-000004" / name).read_bytes()
    assert (out / "loss.png").stat().st_size > 0


def test_a_checkpoint_whose_manifest_lacks_a_file_is_not_resumed(tiny_edit, tmp_path, capsys):
    """The newest checkpoint's optimizer file and its manifest entry gone: it is skipped, named,
    for the one before. Catches a manifest trusted for what it lists only (a raw ENOENT then)."""
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=4, checkpointing_steps=2)
    train.main([cfg])
    newest = tmp_path / "out/checkpoints/step-000004"
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["files"]["optimizer.safetensors"]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    (newest / "optimizer.safetensors").unlink()
    problem = train.verify_checkpoint(newest)
    assert problem == "incomplete (its manifest.json does not list optimizer.safetensors)", problem
    capsys.readouterr()
    train.main([cfg])
    said = capsys.readouterr().out
    assert f"checkpoint {newest} is incomplete" in said and "resumed from" in said, said
    assert "step-000002 at step 2" in said, said


def test_resume_from_checkpoint_is_read_beside_the_config_and_a_missing_one_is_named(
    tiny_edit, tmp_path, monkeypatch
):
    """A relative path is the config's, as every path in it; one that does not exist says so.
    Catches the path taken from the working folder, or "incomplete (manifest.json is missing)"."""
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=2, checkpointing_steps=2)
    train.main([cfg])
    monkeypatch.chdir(tmp_path.parent)
    message = fails([cfg, "--resume_from_checkpoint=out/checkpoints/step-000009"])
    missing = tmp_path / "out/checkpoints/step-000009"
    assert f"{missing} is not there (no such folder)" in message, message
    # the same path, there: resumed (nothing left to train: the LoRA is step 2's)
    train.main([cfg, "--resume_from_checkpoint=out/checkpoints/step-000002"])
    assert [r["step"] for r in losses(tmp_path / "out")] == [1, 2]


def test_an_output_dir_that_would_overwrite_the_config_or_sit_in_the_model_is_refused(
    tiny_edit, tmp_path
):
    """SimpleTuner's config.json with output_dir "." would be overwritten by the run's resolved
    config.json; an output_dir inside the model folder changes the model's identity. Both stop
    before any work, the config untouched. The config.json a run wrote resumes that run. Catches
    the user's config overwritten, or the model folder written into."""
    cfg = Path(write_config(tmp_path, tiny_edit, max_train_steps=2, checkpointing_steps=2))
    keys = {
        line.split(" = ")[0]: json.loads(line.split(" = ")[1])
        for line in cfg.read_text().split("\n[[")[0].splitlines()
    }
    user = tmp_path / "config.json"
    text = json.dumps({**keys, "output_dir": ".", "data_backend_config": "sets.json"})
    user.write_text(text)
    sets = [
        {"id": "edit", "instance_data_dir": str(EXAMPLES / "edit"), "conditioning_data": ["ref"]},
        {"id": "ref", "instance_data_dir": str(EXAMPLES / "ref")},
    ]
    for s in sets:
        s.update(resolution=128, cache_dir_vae=str(tmp_path / "cache" / s["id"]))
    sets[0]["caption_strategy"] = "textfile"
    (tmp_path / "sets.json").write_text(json.dumps(sets))
    message = fails([str(user)])
    assert f"output_dir {tmp_path} holds the config file {user}" in message, message
    assert user.read_text() == text and not (tmp_path / "run.json").exists()
    message = fails([str(cfg), f"--output_dir={tiny_edit / 'lora'}"])
    assert f"is inside the model checkpoint {tiny_edit}" in message, message
    assert not (tiny_edit / "lora").exists()
    train.main([str(cfg)])
    written = tmp_path / "out/config.json"
    train.main([str(written), "--max_train_steps=4"])  # the run's own config.json goes on with it
    assert [r["step"] for r in losses(tmp_path / "out")] == [1, 2, 3, 4]


def test_a_damaged_run_or_data_record_is_named_with_what_to_do(tiny_edit, tmp_path):
    """run.json cut short, data.json not an object: one line naming the file and the way on,
    nothing moved. Catches a bare JSONDecodeError text, or a traceback (a list has no .get)."""
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=2, checkpointing_steps=2)
    train.main([cfg])
    out = tmp_path / "out"
    run = (out / "run.json").read_text()
    (out / "run.json").write_text(run[:20])
    message = fails([cfg, "--max_train_steps=4"])
    assert f"{out / 'run.json'} is damaged (JSONDecodeError" in message, message
    assert "overwrite_output_dir = true" in message and "\n" not in message, message
    (out / "run.json").write_text(run)
    (out / "data.json").write_text("[]")
    message = fails([cfg, "--max_train_steps=4"])
    assert f"{out / 'data.json'} is damaged (not the JSON object" in message, message
    assert "move it aside" in message and "\n" not in message, message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    (out / "run.json").write_text("[1]")  # told to start over, it does
    train.main([cfg, "--overwrite_output_dir=true"])
    assert [r["step"] for r in losses(out)] == [1, 2]
    assert [p.read_text() for p in out.glob("run.json.old-*")] == ["[1]"]


def test_a_resume_says_which_settings_changed_and_overwrite_on_the_same_run(
    tiny_edit, tmp_path, capsys
):
    """Going on with another learning rate is allowed and said, naming that key alone (not the
    longer max_train_steps); overwrite_output_dir on the same run says it resumes. Catches a
    silent change of how the run trains, or a note listing keys that did not change."""
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=2, checkpointing_steps=2)
    train.main([cfg])
    capsys.readouterr()
    train.main([cfg, "--max_train_steps=3", "--learning_rate=5e-4"])
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "settings changed" in line]
    assert note.endswith("since step-000002: learning_rate 0.001 -> 0.0005"), note
    train.main([cfg, "--max_train_steps=4", "--learning_rate=5e-4", "--overwrite_output_dir=true"])
    said = capsys.readouterr().out
    assert "overwrite_output_dir = true, but" in said and "settings changed" not in said, said
    assert [r["step"] for r in losses(tmp_path / "out")] == [1, 2, 3, 4]


def test_an_output_dir_that_cannot_be_made_is_one_line_with_the_way_on(tiny_edit, tmp_path):
    """output_dir under a file (as a read-only folder would be, but this runs as root too).
    Catches the bare "[Errno 20] Not a directory"."""
    (tmp_path / "file").write_text("mine")
    message = fails([write_config(tmp_path, tiny_edit), f"--output_dir={tmp_path / 'file/out'}"])
    assert f"output_dir {tmp_path / 'file/out'}: cannot write there (Not a directory)" in message
    assert "choose a folder you can write" in message and "\n" not in message, message
    assert (tmp_path / "file").read_text() == "mine"
    message = fails([write_config(tmp_path, tiny_edit), f"--output_dir={tmp_path / 'file'}"])
    assert message == f"error: output_dir {tmp_path / 'file'} is a file: choose a folder", message
    assert (tmp_path / "file").read_text() == "mine"


def test_the_config_json_a_run_wrote_runs_from_anywhere_with_relative_paths(tiny_edit, tmp_path):
    """The config says "pairs/edit", "cache/...", output_dir "out", relative to its folder; the
    config.json written into out/ holds them absolute, so running it (from another folder) resumes
    the same run. Catches the paths read against out/ (the data "not a folder", or a new run
    nested in out/out)."""
    copy_pairs(tmp_path / "pairs")
    cfg = Path(write_config(tmp_path, tiny_edit, pairs=Path("pairs"), cache=Path("cache")))
    cfg.write_text(cfg.read_text().replace(f'"{tmp_path / "out"}"', '"out"'))
    train.main([str(cfg), "--max_train_steps=2", "--checkpointing_steps=2"])
    written = json.loads((tmp_path / "out/config.json").read_text())
    assert written["output_dir"] == str(tmp_path / "out"), written["output_dir"]
    assert written["datasets"][0]["instance_data_dir"] == str(tmp_path / "pairs/edit")
    train.main([str(tmp_path / "out/config.json"), "--max_train_steps=4"])
    assert [r["step"] for r in losses(tmp_path / "out")] == [1, 2, 3, 4]
    assert not (tmp_path / "out/out").exists()


def test_a_checkpoint_of_another_output_dir_is_held_to_its_own_runs_data(tiny_edit, tmp_path):
    """Resuming d2 from d1's checkpoint after a pair was removed: the change is named as it is in
    d1 itself, and going on on purpose is recorded in d2's data.json. Catches the data check
    skipped because d2 has no data.json yet (a record claiming the new data from step 0)."""
    pairs = copy_pairs(tmp_path / "pairs")
    first = write_config(tmp_path / "d1", tiny_edit, pairs=pairs, max_train_steps=2)
    train.main([first, "--checkpointing_steps=2"])
    for p in [*pairs.glob("edit/sun.*"), *pairs.glob("ref/sun.*")]:
        p.unlink()
    second = write_config(tmp_path / "d2", tiny_edit, pairs=pairs, max_train_steps=4)
    step2 = tmp_path / "d1/out/checkpoints/step-000002"
    message = fails([second, f"--resume_from_checkpoint={step2}"])
    assert "the data changed since this run began: dataset 'edit': 1 pair(s) removed (sun)" in (
        message
    ), message
    train.main([second, f"--resume_from_checkpoint={step2}", "--resume_with_changed_data=true"])
    record = json.loads((tmp_path / "d2/out/data.json").read_text())
    assert record["changes"] == [
        {"at_step": 2, "changes": ["dataset 'edit': 1 pair(s) removed (sun)"]}
    ]


def test_a_longer_run_on_a_decaying_schedule_is_said_to_match_neither(tmp_path, capsys):
    """Catches a silent re-stretch of the cosine over the new max_train_steps."""
    cfg = config.Config(lr_scheduler="cosine", max_train_steps=2)
    (tmp_path / "state.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))
    train.note_changed_settings(tmp_path, dataclasses.replace(cfg, max_train_steps=4))
    said = capsys.readouterr().out
    assert "max_train_steps 2 -> 4 with lr_scheduler 'cosine'" in said, said
    train.note_changed_settings(tmp_path, dataclasses.replace(cfg, lr_scheduler="constant"))
    assert "max_train_steps" not in capsys.readouterr().out  # a constant rate is the same
