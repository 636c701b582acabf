"""train.py: a run end to end, exact resume, validation that never perturbs training, a learning test, data
parallel on two gloo processes, the LoRA it writes in diffusers, and bad configs that fail cleanly."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, diffusers_pipeline, psnr, run_script
from PIL import Image
from safetensors.torch import load_file, save_file

import lora
import model as M
import train

EXAMPLES = ROOT / "examples"


def write_config(folder, ckpt, pairs=EXAMPLES, **keys) -> str:
    """A training config in `folder` on the example pairs (or a copy of some), caches inside `folder`."""
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
    lines = [
        f"{k} = {v!r}".replace("'", '"') if not isinstance(v, bool) else f"{k} = {str(v).lower()}"
        for k, v in base.items()
    ]
    for ds in (
        f'id = "edit"\ninstance_data_dir = "{pairs}/edit"\ncaption_strategy = "textfile"\n'
        f'resolution = 128\nconditioning_data = ["ref"]\ncache_dir_vae = "{folder}/cache/edit"',
        f'id = "ref"\ninstance_data_dir = "{pairs}/ref"\ncache_dir_vae = "{folder}/cache/ref"',
    ):
        lines.append(f"\n[[datasets]]\n{ds}")
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def lora_of(out) -> dict:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def test_the_tiny_example_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # where `tiny` writes its checkpoint
    out = tmp_path / "run"
    run_script(
        ROOT / "train.py",
        EXAMPLES / "tiny.toml",
        f"--output_dir={out}",
        "--max_train_steps=4",
        "--checkpointing_steps=2",
        "--validation_steps=2",
        "--validation_num_inference_steps=2",
    )
    state = lora_of(out)
    assert state and all(k.startswith("transformer.") for k in state)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-000000.png", "step-000002.png", "step-000004.png"]
    assert Image.open(out / "validation/step-000004.png").size == (2 * 192, 128)  # reference | result
    assert (
        Image.open(out / "loss.png").size[0] > 0 and len((out / "loss.jsonl").read_text().splitlines()) == 4
    )
    assert (tmp_path / "xdg/minicat/tiny-edit-v1/model_index.json").exists()


def test_resume_ends_exactly_where_a_straight_run_does(tiny_edit, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train.main([write_config(tmp_path / "a", tiny_edit, max_train_steps=6)])
    cfg_b = write_config(tmp_path / "b", tiny_edit, max_train_steps=3)
    train.main([cfg_b])
    train.main([cfg_b, "--max_train_steps=6"])  # raising the step count continues the same run
    a, b = lora_of(tmp_path / "a/out"), lora_of(tmp_path / "b/out")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained


def test_validation_does_not_change_training(tiny_edit, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train.main([write_config(tmp_path / "a", tiny_edit, max_train_steps=4)])
    train.main(
        [
            write_config(
                tmp_path / "b",
                tiny_edit,
                max_train_steps=4,
                validation_steps=2,
                validation_num_inference_steps=2,
                validation_resolution="64x64",
            )
        ]
    )
    a, b = lora_of(tmp_path / "a/out"), lora_of(tmp_path / "b/out")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "b/out/validation").glob("*.png"))) == 3


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
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in (tmp_path / "out/loss.jsonl").open()]
    assert np.mean(losses[-20:]) < 0.75 * np.mean(losses[:5]), (np.mean(losses[:5]), np.mean(losses[-20:]))

    # Sample the pair's edit with and without the LoRA: the LoRA must bring the result closer to the target.
    te, vae = M.load_text_encoder(tiny_edit, torch.float32), M.load_vae(tiny_edit)
    ref = Image.open(pairs / "ref/circle.png").convert("RGB")  # 192x128: its own bucket at 128 px res
    w, h = 160, 96
    ref, target = ref.resize((w, h), Image.LANCZOS), Image.open(pairs / "edit/circle.png").resize((w, h))
    with torch.no_grad():
        txt = te.encode("make the circle red", ref)
        ref_z, target_z = (M.to_latent(vae, M.pil_to_tensor(im)) for im in (ref, target))
    sigmas = M.schedule(8, (h // 16) * (w // 16), M.read_scheduler(tiny_edit))
    noise = M.initial_noise(0, h, w, torch.float32)
    transformer = M.load_transformer(tiny_edit, torch.float32)
    before = M.sample(transformer, noise, txt, None, sigmas, 1.0, ref=ref_z, progress=False)
    lora.load_lora(transformer, tmp_path / "out/pytorch_lora_weights.safetensors")
    after = M.sample(transformer, noise, txt, None, sigmas, 1.0, ref=ref_z, progress=False)
    d_before, d_after = (before - target_z).square().mean(), (after - target_z).square().mean()
    assert d_after < 0.7 * d_before, (d_before.item(), d_after.item())


def _ddp_rank(rank: int, cfg: str, folder: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    transformer = train.train(train.load_config(Path(cfg), []), ROOT)
    save_file(lora.lora_state_dict(transformer), f"{folder}/rank{rank}.safetensors")


def test_two_gloo_processes_end_with_identical_loras(tiny_edit, tmp_path):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=3, checkpointing_steps=3)
    mp.start_processes(
        _ddp_rank, args=(cfg, str(tmp_path), 29500 + os.getpid() % 1000), nprocs=2, start_method="spawn"
    )
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(r0[k].abs().sum() > 0 for k in r0 if "lora_B" in k)


def test_diffusers_applies_the_trained_lora_as_validate_does(tiny_edit, tmp_path):
    train.main([write_config(tmp_path, tiny_edit, learning_rate=2e-2, max_train_steps=4)])
    lora_file = tmp_path / "out/pytorch_lora_weights.safetensors"
    ref = EXAMPLES / "ref/sun.png"
    args = (
        ROOT / "validate.py",
        "--model",
        tiny_edit,
        "--ref",
        ref,
        "--prompt",
        "add a sun",
        "--steps",
        3,
        "--resolution",
        "160x160",
    )
    run_script(*args, "--lora", lora_file, "--out", tmp_path / "lora.png")
    run_script(*args, "--out", tmp_path / "base.png")
    import diffusers.pipelines.longcat_image.pipeline_longcat_image_edit as edit

    pipe = diffusers_pipeline(tiny_edit)
    pipe.transformer.load_lora_adapter(lora_file, prefix="transformer", use_safetensors=True)
    original, edit.calculate_dimensions = edit.calculate_dimensions, lambda area, ratio: (160, 160)
    try:
        want = pipe(
            Image.open(ref), "add a sun", num_inference_steps=3, generator=torch.Generator().manual_seed(0)
        )
    finally:
        edit.calculate_dimensions = original
    got = Image.open(tmp_path / "lora.png")
    assert psnr(got, want.images[0]) >= 60, psnr(got, want.images[0])
    assert psnr(got, Image.open(tmp_path / "base.png")) < 50, "the trained LoRA should change the image"


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_edit, tmp_path):
    cfg = write_config(tmp_path, tiny_edit, learning_rate=1e30, max_grad_norm=0.0, checkpointing_steps=1)
    proc = run_script(ROOT / "train.py", cfg, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "the loss is nan" in proc.stderr or "the loss is inf" in proc.stderr, proc.stderr
    kept = sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir())
    assert (
        kept
        and kept[-1] in proc.stderr
        and all(torch.isfinite(v).all() for v in lora_of(tmp_path / "out").values())
    )


def test_another_run_in_the_same_output_dir_is_refused(tiny_edit, tmp_path):
    cfg = write_config(tmp_path, tiny_edit, max_train_steps=2, checkpointing_steps=2)
    train.main([cfg])
    with pytest.raises(SystemExit, match="holds another run \\(lora_rank: 4 there, 8 now\\)"):
        train.main([cfg, "--lora_rank=8"])
    train.main([cfg, "--lora_rank=8", "--overwrite_output_dir=true"])  # told to: the old run is moved aside
    assert len(list(tmp_path.glob("out/checkpoints.old-*/step-000002"))) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lerning_rate=1e-4"], "unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
        (["--learning_rate=fast"], "learning_rate should be float"),
        (["--lr_scheduler=step"], "lr_scheduler = 'step'; choose one of"),
        (["--base_model_precision=int4"], "base_model_precision: unknown quantization mode 'int4'"),
        (["--pretrained_model_name_or_path=/nowhere/ckpt"], "no such folder"),
    ],
)
def test_bad_configs_fail_cleanly_naming_the_key(tiny_edit, tmp_path, args, message):
    proc = run_script(ROOT / "train.py", write_config(tmp_path, tiny_edit), *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_key_in_the_file_is_named(tiny_edit, tmp_path):
    cfg = write_config(tmp_path, tiny_edit, validaton_steps=5)
    proc = run_script(ROOT / "train.py", cfg, check=False)
    assert (
        proc.returncode != 0
        and "unknown key 'validaton_steps' (did you mean 'validation_steps'?)" in proc.stderr
    )
