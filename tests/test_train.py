"""train.py as a specification: a run end to end, exact resume (after a clean stop or a kill -9),
data parallel equal to one process on the same global batch, validation that never perturbs
training, a learning test, the LoRA it writes applied by diffusers as validate.py applies it, and
every fault made to happen: corrupt and foreign checkpoints, two runs on one folder, a full disk, a
non-finite step, out of memory, bad config values. Tiny random checkpoint, CPU."""

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, assert_one_line_error, diffusers_pipeline, psnr, train_cli, validate_cli
from PIL import Image
from safetensors.torch import load_file, save_file

import config
import images
import lora
import model as M
import pipeline
import train

EXAMPLES = ROOT / "examples"


def write_config(folder: Path, ckpt, pairs=EXAMPLES, cache: Path | None = None, **keys) -> str:
    """A training config in `folder` on the example pairs (or a copy of some), caches in `cache`
    (default: inside `folder`)."""
    cache = cache or folder / "cache"
    base = dict(
        pretrained_model_name_or_path=str(ckpt),
        base_model_precision="no_change",
        lora_rank=4,
        lora_alpha=8,
        learning_rate=1e-3,
        max_train_steps=6,
        checkpointing_steps=3,
        validation_steps=0,
        output_dir=str(folder / "out"),
        seed=3,
        aspect_bucket_alignment=32,
        mixed_precision="no",
    )
    base.update(keys)
    lines = [f"{k} = {json.dumps(v)}" for k, v in base.items()]
    lines += [
        f'\n[[datasets]]\nid = "edit"\ninstance_data_dir = "{pairs}/edit"\n'
        'caption_strategy = "textfile"\n'
        f'resolution = 128\nconditioning_data = ["ref"]\ncache_dir_vae = "{cache}/edit"',
        f'\n[[datasets]]\nid = "ref"\ninstance_data_dir = "{pairs}/ref"\n'
        f'cache_dir_vae = "{cache}/ref"',
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text("\n".join(lines) + "\n")
    return str(folder / "config.toml")


def lora_of(out: Path, name="pytorch_lora_weights.safetensors") -> dict:
    return load_file(str(out / name))


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]


def same_lora(a: dict, b: dict, tol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= tol for k in a)


def fails(argv: list[str]) -> str:
    """The one-line message train.py exits with (in process)."""
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    return str(stop.value)


# --------------------------------------------------------------------------------------------------
# A run


def test_the_tiny_example_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    keys = dict(output_dir=out, max_train_steps=4, checkpointing_steps=2, validation_steps=2)
    train_cli(
        EXAMPLES / "tiny.toml",
        validation_num_inference_steps=2,
        env={"XDG_CACHE_HOME": str(tmp_path)},
        **keys,
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    for ckpt in (out / "checkpoints").iterdir():
        assert train.verify_checkpoint(ckpt) is None
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        f"step-00000{i}.png" for i in (0, 2, 4)
    ]
    grid = Image.open(out / "validation/step-000004.png")
    assert grid.size[0] == 2 * 192 and grid.size[1] > 128  # reference | result, under a caption
    assert [row["step"] for row in losses(out)] == [1, 2, 3, 4]
    assert same_lora(lora_of(out), lora_of(out / "checkpoints/step-000004"))
    assert (tmp_path / f"minicat/tiny-edit-v{__import__('tiny').VERSION}/model_index.json").exists()


def test_resume_ends_exactly_where_a_straight_run_does(tiny_edit, tmp_path):
    train.main([write_config(tmp_path / "a", tiny_edit, max_train_steps=6)])
    cfg_b = write_config(tmp_path / "b", tiny_edit, max_train_steps=3)
    train.main([cfg_b])
    train.main([cfg_b, "--max_train_steps=6"])  # raising the step count continues the same run
    a, b = lora_of(tmp_path / "a/out"), lora_of(tmp_path / "b/out")
    assert same_lora(a, b), max((a[k] - b[k]).abs().max() for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained
    assert losses(tmp_path / "a/out") == losses(tmp_path / "b/out")


def test_a_kill_at_any_moment_resumes_bit_identically(tiny_edit, tmp_path):
    """kill -9 somewhere in steps 5-8 (mid-step, mid-checkpoint, mid-log line), then the same
    command again: the same LoRA and loss log as a straight run, all in fresh processes as a user
    runs them."""
    train_cli(write_config(tmp_path / "a", tiny_edit, max_train_steps=12, checkpointing_steps=2))
    cfg = write_config(tmp_path / "b", tiny_edit, max_train_steps=12, checkpointing_steps=2)
    proc = subprocess.Popen(
        [sys.executable, ROOT / "train.py", cfg],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # a different moment each run (printed, to replay one): mid-step, mid-checkpoint or mid-log line
    delay = random.Random().uniform(0.0, 1.0)
    print(f"kill -9 {delay:.3f} s after checkpoint step-000004 appeared")
    deadline = time.time() + 300
    while not (tmp_path / "b/out/checkpoints/step-000004").exists():
        assert proc.poll() is None, "the run ended before its step-4 checkpoint"
        assert time.time() < deadline, "the run did not reach its step-4 checkpoint in 300 s"
        time.sleep(0.05)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before the kill: nothing was tested"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train_cli(cfg)
    assert same_lora(lora_of(tmp_path / "a/out"), lora_of(tmp_path / "b/out"))
    assert losses(tmp_path / "a/out") == losses(tmp_path / "b/out")  # cut back: one line per step


def test_validation_does_not_change_training_and_shows_captions_and_previews(tiny_edit, tmp_path):
    train.main([write_config(tmp_path / "a", tiny_edit, max_train_steps=4)])
    cfg = write_config(
        tmp_path / "b",
        tiny_edit,
        max_train_steps=4,
        validation_steps=2,
        validation_preview_steps=2,
        validation_num_inference_steps=4,
        validation_resolution="64x64",
    )
    train.main([cfg])
    assert same_lora(lora_of(tmp_path / "a/out"), lora_of(tmp_path / "b/out"))
    grids = sorted((tmp_path / "b/out/validation").glob("*.png"))
    assert len(grids) == 3
    grid = np.asarray(Image.open(grids[-1]))
    # reference | preview at sampler step 2 | result under a caption of dark text, each at the
    # reference's 3:2 aspect with 64x64's area, sides rounded up to 16: sqrt(4096 * 1.5) = 78.4 ->
    # 80
    assert grid.shape[1] == 3 * 80 and grid.shape[0] > 64 + 20, grid.shape
    assert (grid[:20].min(axis=2) < 100).sum() > 50, "the caption is written above the row"


def test_the_loss_curve_has_a_point_per_step_its_mean_and_the_learning_rate(tmp_path):
    rows = [
        {"step": s, "loss": 1.0 + 0.3 * np.sin(s), "lr": 1e-3 * min(1, s / 10)}
        for s in range(1, 41)
    ]
    images.plot_losses(rows, tmp_path / "loss.png")
    img = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB")).astype(int)

    def has(colour):
        return (np.abs(img - colour).sum(axis=2) < 30).sum()

    assert has((20, 60, 160)) > 200 and has((230, 140, 20)) > 100 and has((170, 190, 230)) > 100
    assert images.nice_ticks(1, 40, 8) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert images.nice_ticks(0.0, 1e-3, 5) == pytest.approx([0, 2e-4, 4e-4, 6e-4, 8e-4, 1e-3])


def test_it_learns_one_pair_and_sampling_moves_toward_the_target(tiny_edit, tmp_path):
    pairs = tmp_path / "pairs"
    for sub, ext in (("edit", ".png"), ("edit", ".txt"), ("ref", ".png")):
        (pairs / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLES / sub / f"circle{ext}", pairs / sub / f"circle{ext}")
    cfg = write_config(
        tmp_path,
        tiny_edit,
        pairs,
        lora_rank=16,
        lora_alpha=16,
        learning_rate=1e-2,
        max_train_steps=120,
        checkpointing_steps=120,
        caption_dropout_probability=0.0,
    )
    train.main([cfg])
    loss = [row["loss"] for row in losses(tmp_path / "out")]
    assert np.mean(loss[-20:]) < 0.75 * np.mean(loss[:5]), (np.mean(loss[:5]), np.mean(loss[-20:]))

    # Sample the pair's edit with and without the LoRA: the LoRA must bring the result closer to the
    # target.
    te, vae = pipeline.load_text_encoder(tiny_edit, torch.float32), M.load_vae(tiny_edit)
    w, h = 160, 96  # 192x128 sits in its own bucket at 128 px resolution
    ref = images.load_rgb(pairs / "ref/circle.png").resize((w, h), Image.LANCZOS)
    target = images.load_rgb(pairs / "edit/circle.png").resize((w, h))
    with torch.no_grad():
        txt = te.encode("make the circle red", ref)
        ref_z, target_z = (M.to_latent(vae, images.pil_to_tensor(im)) for im in (ref, target))
    sigmas = M.schedule(8, (h // 16) * (w // 16), M.read_scheduler(tiny_edit))
    noise = pipeline.initial_noise(0, h, w, torch.float32)
    transformer = M.load_transformer(tiny_edit, torch.float32)
    before = pipeline.sample(
        transformer, noise, txt, None, sigmas, 1.0, refs=[ref_z], progress=False
    )
    lora.load_lora(transformer, tmp_path / "out/pytorch_lora_weights.safetensors")
    after = pipeline.sample(
        transformer, noise, txt, None, sigmas, 1.0, refs=[ref_z], progress=False
    )
    d_before, d_after = (before - target_z).square().mean(), (after - target_z).square().mean()
    assert d_after < 0.7 * d_before, (d_before.item(), d_after.item())


def ddp_rank(rank: int, cfg: str, folder: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    transformer = train.train(config.load_config(Path(cfg), []), ROOT)
    save_file(lora.lora_state_dict(transformer), f"{folder}/rank{rank}.safetensors")


def test_two_gloo_processes_train_as_one_process_on_the_same_global_batch(tiny_edit, tmp_path):
    cfg = write_config(
        tmp_path / "ddp", tiny_edit, max_train_steps=3, checkpointing_steps=3, train_batch_size=1
    )
    mp.start_processes(
        ddp_rank,
        args=(cfg, str(tmp_path), 29500 + os.getpid() % 1000),
        nprocs=2,
        start_method="spawn",
    )
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert same_lora(r0, r1)  # the ranks agree exactly ...
    single = write_config(
        tmp_path / "one", tiny_edit, max_train_steps=3, checkpointing_steps=3, train_batch_size=2
    )
    state = lora.lora_state_dict(train.train(config.load_config(Path(single), []), ROOT))
    # ... and with one process on batches of 2 (the same global batches, the same per-sample noise),
    # up to the order of float sums: per step the losses to 1e-6, the weights far closer than a
    # step's change
    ddp, one = losses(tmp_path / "ddp/out"), losses(tmp_path / "one/out")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3]
    assert all(
        abs(a["loss"] - b["loss"]) <= 1e-6 * b["loss"] for a, b in zip(ddp, one, strict=True)
    ), (
        ddp,
        one,
    )
    step = max(state[k].abs().max() for k in state if "lora_B" in k) / 3  # B's mean change per step
    assert step > 0 and same_lora(r0, state, tol=0.05 * step), max(
        (r0[k] - state[k]).abs().max() for k in r0
    )


def test_diffusers_applies_the_trained_lora_as_validate_does(tiny_edit, tmp_path):
    """lora_alpha 8 != lora_rank 4, and diffusers' plain load_lora_adapter call (the one the
    README shows)."""
    train.main([write_config(tmp_path, tiny_edit, learning_rate=2e-2, max_train_steps=4)])
    lora_file, ref = tmp_path / "out/pytorch_lora_weights.safetensors", EXAMPLES / "ref/sun.png"
    common = dict(model=tiny_edit, ref=ref, prompt="add a sun", steps=3, resolution="160x160")
    validate_cli(lora=lora_file, out=tmp_path / "lora.png", **common)
    validate_cli(out=tmp_path / "base.png", **common)
    import diffusers.pipelines.longcat_image.pipeline_longcat_image_edit as edit

    pipe = diffusers_pipeline(tiny_edit)
    pipe.transformer.load_lora_adapter(lora_file, prefix="transformer")
    original, edit.calculate_dimensions = edit.calculate_dimensions, lambda area, ratio: (160, 160)
    try:
        g = torch.Generator().manual_seed(0)
        want = pipe(images.load_rgb(ref), "add a sun", num_inference_steps=3, generator=g).images[0]
    finally:
        edit.calculate_dimensions = original
    got = Image.open(tmp_path / "lora.png")
    assert psnr(got, want) >= 60, psnr(got, want)
    assert psnr(got, Image.open(tmp_path / "base.png")) < 50, (
        "the trained LoRA should change the image"
    )


def test_encoders_are_read_once_per_run_whatever_the_samples_and_prompts(
    tiny_edit, tmp_path, monkeypatch
):
    reads = {"vae": 0, "text_encoder": 0}
    for owner, name in ((M, "vae"), (pipeline, "text_encoder")):
        load = getattr(owner, f"load_{name}")

        def counted(*args, _load=load, _name=name, **kwargs):
            reads[_name] += 1
            return _load(*args, **kwargs)

        monkeypatch.setattr(owner, f"load_{name}", counted)
    refs = [str(EXAMPLES / "ref/sun.png"), str(EXAMPLES / "ref/circle.png")]
    cfg = write_config(
        tmp_path,
        tiny_edit,
        max_train_steps=2,
        validation_steps=1,
        validation_num_inference_steps=1,
        validation_prompt=["add a sun", "make it red"],
        validation_reference=refs,
        validation_resolution="64x64",
    )
    train.main([cfg])  # 6 pairs: every latent and text to cache, 2 prompts, 3 validations
    assert reads == {"vae": 1, "text_encoder": 1}, reads
    assert len(list((tmp_path / "out/validation").glob("*.png"))) == 3


def test_text_encoder_precision_int8_trains_and_never_reuses_another_precisions_texts(
    tiny_edit, tmp_path
):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=1, checkpointing_steps=1)
    train.main([cfg])
    texts = set((tmp_path / "cache/text").iterdir())
    train.main([cfg, "--text_encoder_precision=int8-quanto", "--max_train_steps=2"])
    new = set((tmp_path / "cache/text").iterdir()) - texts
    assert len(new) == len(texts) >= 6  # every text encoded again at int8; the float ones kept
    assert [row["step"] for row in losses(tmp_path / "out")] == [1, 2]


# --------------------------------------------------------------------------------------------------
# Checkpoints: verified or not used, never another run's


def test_a_corrupt_newest_checkpoint_is_skipped_and_an_older_one_resumes_exactly(
    tiny_edit, tmp_path
):
    train.main([write_config(tmp_path / "a", tiny_edit, max_train_steps=6, checkpointing_steps=2)])
    cfg = write_config(tmp_path / "b", tiny_edit, max_train_steps=4, checkpointing_steps=2)
    train.main([cfg])
    newest = tmp_path / "b/out/checkpoints/step-000004"
    blob = (newest / "lora.safetensors").read_bytes()
    (newest / "lora.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated
    assert "lora.safetensors is damaged" in train.verify_checkpoint(newest)
    train.main([cfg, "--max_train_steps=6"])
    assert same_lora(lora_of(tmp_path / "a/out"), lora_of(tmp_path / "b/out"))
    kept = sorted(p.name for p in (tmp_path / "b/out/checkpoints").iterdir())
    assert kept == ["step-000002", "step-000004", "step-000006"], kept
    # the damaged one is kept aside, with what else that run wrote after step 2
    (aside,) = (tmp_path / "b/out").glob("superseded-*/checkpoints/step-000004")
    assert (aside / "lora.safetensors").read_bytes() == blob[: len(blob) // 2]


def test_resuming_an_older_checkpoint_moves_the_newer_aside(tiny_edit, tmp_path):
    train.main([write_config(tmp_path / "a", tiny_edit, max_train_steps=6, checkpointing_steps=2)])
    cfg = write_config(tmp_path / "b", tiny_edit, max_train_steps=6, checkpointing_steps=2)
    train.main([cfg])
    old = tmp_path / "b/out/checkpoints/step-000002"
    train.main(
        [cfg, f"--resume_from_checkpoint={old}"]
    )  # re-runs steps 3-6 over the newer checkpoints
    assert same_lora(lora_of(tmp_path / "a/out"), lora_of(tmp_path / "b/out"))
    (aside,) = (tmp_path / "b/out").glob("superseded-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == [
        "step-000004",
        "step-000006",
    ]
    # the earlier run's loss log is kept whole beside them, and the new one has one row per step
    assert [r["step"] for r in losses(aside)] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in losses(tmp_path / "b/out")] == [1, 2, 3, 4, 5, 6]


def test_another_runs_checkpoint_is_refused(tiny_edit, tmp_path):
    train.main(
        [
            write_config(
                tmp_path / "r8", tiny_edit, lora_rank=8, max_train_steps=2, checkpointing_steps=2
            )
        ]
    )
    other = tmp_path / "r8/out/checkpoints/step-000002"
    message = fails([write_config(tmp_path / "r4", tiny_edit), f"--resume_from_checkpoint={other}"])
    assert "is from another run (lora_rank: 8 there, 4 now)" in message and "\n" not in message, (
        message
    )


def test_another_run_in_the_same_output_dir_is_refused_and_overwrite_moves_it_aside(
    tiny_edit, tmp_path
):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=2, checkpointing_steps=2)
    train.main([cfg])
    assert "holds another run (lora_rank: 4 there, 8 now)" in fails([cfg, "--lora_rank=8"])
    train.main(
        [cfg, "--lora_rank=8", "--overwrite_output_dir=true"]
    )  # told to: the old run is moved aside
    assert len(list(tmp_path.glob("out/checkpoints.old-*/step-000002"))) == 1
    assert (
        len(list(tmp_path.glob("out/loss.jsonl.old-*"))) == 1 and len(losses(tmp_path / "out")) == 2
    )


def test_a_dataset_typo_is_reported_as_such_and_nothing_is_moved(tiny_edit, tmp_path):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=2, checkpointing_steps=2)
    train.main([cfg])
    Path(cfg).write_text(
        Path(cfg).read_text().replace('instance_data_dir = "', 'instance_data_dir = "/typo')
    )
    message = fails([cfg, "--lora_rank=8", "--overwrite_output_dir=true"])
    assert "instance_data_dir /typo" in message and "is not a folder" in message, message
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "old" in p.name) == []


def test_a_second_run_on_the_same_folder_stops_and_a_killed_runs_lock_is_taken_over(
    tiny_edit, tmp_path
):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=400, checkpointing_steps=400)
    first = subprocess.Popen(
        [sys.executable, ROOT / "train.py", cfg],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while "pid" not in (
        (tmp_path / "out/.lock").read_text() if (tmp_path / "out/.lock").exists() else ""
    ):
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    message = fails([cfg, "--max_train_steps=2"])
    assert f"is in use by pid {first.pid}" in message, message
    first.send_signal(signal.SIGKILL)
    first.wait()
    train.main(
        [cfg, "--max_train_steps=2", "--checkpointing_steps=2"]
    )  # the lock of a dead run is free
    assert [row["step"] for row in losses(tmp_path / "out")] == [1, 2]


def limit_file_size(nbytes: int):
    def apply():
        signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tiny_edit, tmp_path):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=2, checkpointing_steps=2)
    train.main([cfg])  # caches and a first checkpoint, written freely
    proc = subprocess.run(
        [sys.executable, ROOT / "train.py", cfg, "--max_train_steps=4"],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size(100_000),
    )
    assert_one_line_error(proc, "step-000004: cannot write the checkpoint", "free disk space")
    names = sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir())
    assert (
        names == ["step-000002"]
        and train.verify_checkpoint(tmp_path / "out/checkpoints/step-000002") is None
    )
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


# --------------------------------------------------------------------------------------------------
# Non-finite steps and out of memory


def test_a_non_finite_step_is_never_applied_and_the_last_truly_good_checkpoint_is_named(
    tiny_edit, tmp_path, monkeypatch
):
    """Step 4's loss is NaN: step 4 is not applied, step 3's checkpoint (whose weights gave it) is
    moved aside, step 2's is named, and the shared LoRA file is step 2's."""
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=6, checkpointing_steps=1)
    real = train.batch_loss

    def nan_at_step_4(transformer, batch, rows, step, *args):
        loss = real(transformer, batch, rows, step, *args)
        return loss * float("nan") if step == 3 else loss

    monkeypatch.setattr(train, "batch_loss", nan_at_step_4)
    message = fails([cfg])
    good = tmp_path / "out/checkpoints/step-000002"
    assert (
        "the loss is nan (gradient norm nan) at step 4: it was not applied; "
        f"the last good checkpoint is {good}" in message
    )
    assert "step-000003 moved aside" in message and "\n" not in message, message
    names = sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir())
    assert names[:2] == ["step-000001", "step-000002"] and names[2].startswith(
        "step-000003.nonfinite-"
    ), names
    assert same_lora(lora_of(tmp_path / "out"), lora_of(good))
    assert [row["step"] for row in losses(tmp_path / "out")] == [1, 2, 3]


def test_out_of_memory_in_a_step_is_one_line_and_keeps_the_checkpoint(
    tiny_edit, tmp_path, monkeypatch
):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=6, checkpointing_steps=2)
    real = train.batch_loss

    def oom_at_step_3(transformer, batch, rows, step, *args):
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB.")
        return real(transformer, batch, rows, step, *args)

    monkeypatch.setattr(train, "batch_loss", oom_at_step_3)
    message = fails([cfg])
    assert (
        message.startswith("error: out of GPU memory while training step 3 (")
        and "\n" not in message
    ), message
    assert (
        'base_model_precision = "int8"' in message
        and "checkpoint_keep_attention = false" in message
    )
    assert (
        "step-000002" in message
        and train.verify_checkpoint(tmp_path / "out/checkpoints/step-000002") is None
    )


# --------------------------------------------------------------------------------------------------
# Config values


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lerning_rate=1e-4"], "unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
        (["--learning_rate=fast"], "learning_rate should be float"),
        (["--lr_scheduler=step"], "lr_scheduler = 'step': choose one of"),
        (["--base_model_precision=int4"], "base_model_precision: unknown quantization mode 'int4'"),
        (
            ["--text_encoder_precision=fp8-compute"],
            "text_encoder_precision: unknown quantization mode",
        ),
        (["--pretrained_model_name_or_path=/nowhere/ckpt"], "no such folder"),
        (["--checkpointing_steps=0"], "checkpointing_steps = 0: must be at least 1"),
        (["--device=bogus"], "device = 'bogus': not a device"),
        (["--lora_alpha=0"], "lora_alpha = 0.0: must be in (0, 1000000.0]"),
        (
            ["--caption_dropout_probability=7"],
            "caption_dropout_probability = 7.0: must be in [0, 1]",
        ),
        (["--learning_rate=-1"], "learning_rate = -1.0: must be in (0, 1]"),
        (["--learning_rate=1e9"], "learning_rate = 1000000000.0: must be in (0, 1]"),
        (["--lora_dropout=1.5"], "lora_dropout = 1.5: must be in [0, 1)"),
        (["--validation_resolution=abc"], "validation_resolution 'abc': expected WxH"),
        (["--attention_backend=fast"], "attention_backend = 'fast': choose one of auto"),
        (
            ["--attention_backend=cudnn", "--device=cpu"],
            "attention_backend = 'cudnn': not available on cpu",
        ),
        (
            ["--offload_blocks=2", "--gradient_checkpointing=false"],
            "offload_blocks needs gradient_checkpointing",
        ),
        (['--lora_targets=[""]'], "lora_targets = ['']"),  # [] = the preset's
        # before any caching (out/ never made): no module of the model has that name
        (['--lora_targets=["to_qq"]'], "lora_targets = ['to_qq']: no module of the model matches"),
    ],
)
def test_bad_configs_fail_cleanly_naming_the_key(tiny_edit, tmp_path, args, message):
    message_got = fails([write_config(tmp_path, tiny_edit), *args])
    assert (
        message in message_got and message_got.startswith("error: ") and "\n" not in message_got
    ), message_got
    assert not (tmp_path / "out").exists()


def test_config_errors_leave_the_process_without_a_traceback(tiny_edit, tmp_path):
    cfg = write_config(tmp_path, tiny_edit, validaton_steps=5)
    assert_one_line_error(
        train_cli(cfg, check=False),
        "unknown key 'validaton_steps' (did you mean 'validation_steps'?)",
    )


def test_bf16_training_without_autocast_stays_within_bf16_rounding_of_autocast(tiny_edit):
    """mixed_precision = "bf16" runs the base and activations in bf16 with no autocast (fewer casts;
    LoRA weights stay float32): on the CPU its loss is within 1% of a float32 model under bf16
    autocast and its LoRA gradients point the same way (cosine > 0.99)."""
    g = torch.Generator().manual_seed(0)
    x0, ref, noise = (torch.randn(1, 16, 6, 8, generator=g) for _ in range(3))
    text, sigma = torch.randn(1, 5, 64, generator=g), torch.tensor([0.6])
    results = {}
    for name in ("autocast", "bf16"):
        model = M.load_transformer(tiny_edit, torch.bfloat16 if name == "bf16" else torch.float32)
        torch.manual_seed(1)
        lora.inject_lora(model, 4, 4)
        for p in (p for n, p in model.named_parameters() if "lora_B" in n):
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        lora.mark_only_lora_as_trainable(model)
        with torch.autocast("cpu", torch.bfloat16, enabled=name == "autocast"):
            loss = train.flow_loss(model, x0, ref, text, sigma, noise)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results[name] = loss.item(), grads
    (a, ga), (b, gb) = results["autocast"], results["bf16"]
    assert abs(a - b) <= 0.01 * a, (a, b)
    cosine = torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()
    assert cosine > 0.99, cosine


def test_the_shipped_configs_are_valid():
    """config.toml and examples/tiny.toml load with every key known, typed and in range."""
    real = config.load_config(ROOT / "config.toml", [])
    assert (
        real.pretrained_model_name_or_path == "meituan-longcat/LongCat-Image-Edit" and real.datasets
    )
    assert real.text_encoder_precision == "int8" and real.attention_backend == "auto"
    assert config.load_config(EXAMPLES / "tiny.toml", []).pretrained_model_name_or_path == "tiny"


def test_gradients_are_averaged_in_one_call_and_a_missing_gradient_counts_as_zero(monkeypatch):
    """average_over_ranks: one all_reduce of one flat buffer per step (it was one call per LoRA
    tensor), and a tensor with no gradient on this rank is zeros, not a crash."""
    import torch.distributed as dist

    calls = []

    def all_reduce(t):  # a second rank holding the same gradients, and a loss of 3.0
        calls.append(t.numel())
        other = t.clone()
        other[-1] = 3.0
        t.add_(other)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.arange(6.0).view(2, 3)
    loss = train.average_over_ranks([a, b], 1.0, "cpu")
    assert calls == [6 + 4 + 1]
    assert torch.equal(a.grad, torch.arange(6.0).view(2, 3))  # (g + g) / 2
    assert torch.equal(b.grad, torch.zeros(4))
    assert loss == (1.0 + 3.0) / 2


def test_a_config_without_datasets_names_its_file(tmp_path):
    """An empty config.json (a SimpleTuner config missing data_backend_config): one line naming the
    file and both ways to give datasets. Catches the bare "needs [[datasets]] tables"."""
    path = tmp_path / "config.json"
    path.write_text("{}")
    message = fails([str(path)])
    assert message.startswith(f"error: {path} names no datasets"), message
    assert "data_backend_config" in message and "\n" not in message, message


def test_ctrl_c_exits_130_with_the_way_on(monkeypatch, capsys, tmp_path):
    """Ctrl-C is rc 130 (as a shell reports it), so a script tells it from a failure (rc 1); the
    message says how to resume. Catches sys.exit(message), which is rc 1."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    monkeypatch.setattr(train, "train", Mock(side_effect=KeyboardInterrupt))
    with pytest.raises(SystemExit) as stop:
        train.main([str(cfg)])
    assert stop.value.code == 130
    assert "interrupted: run the same command again" in capsys.readouterr().err
