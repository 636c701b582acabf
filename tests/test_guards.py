"""Every training guard has a test that fails without it (issue 22, item 2): a checkpoint damaged
with its size kept is refused; an infinite gradient with a finite loss is never applied; the applied
gradient is clipped; caption dropout drops as often as configured; a resume with LoRA dropout is
exact because the RNG state is restored; the learning rate's warmup and decay take the values of
their formula; old checkpoints rotate out. Tiny random checkpoint, CPU; runs go through the command
line wherever nothing is patched."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_cli
from safetensors.torch import load_file
from test_train import write_config as train_config

import config
import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One latent and text cache for all runs here (entries are named by content: safe to share)."""
    return tmp_path_factory.mktemp("cache")


def write_config(folder: Path, ckpt: Path, cache: Path, **keys) -> Path:
    """test_train's config with shorter runs (4 steps, a checkpoint every 2) and one shared cache."""
    keys = {"max_train_steps": 4, "checkpointing_steps": 2, **keys}
    return Path(train_config(folder, ckpt, cache=cache, **keys))


def lora_file(out: Path, name: str = "pytorch_lora_weights.safetensors") -> dict:
    """A LoRA file's tensors, copied: load_file maps the file, so a later write would show."""
    return {k: v.clone() for k, v in load_file(str(out / name)).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]


def fails(argv: list) -> str:
    """The one-line message train.py exits with, run in this process (so a test can patch it)."""
    with pytest.raises(SystemExit) as stop:
        train.main([str(a) for a in argv])
    return str(stop.value)


def flip_last_bytes(path: Path, n: int = 4) -> None:
    """Change the file's last n bytes (tensor data, not the header): the same size, still a valid
    safetensors file."""
    blob = bytearray(path.read_bytes())
    for i in range(1, n + 1):
        blob[-i] ^= 0x5A
    path.write_bytes(bytes(blob))


# --------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def four_steps(tiny_edit, cache, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (its folder; not to be changed)."""
    folder = tmp_path_factory.mktemp("four")
    train_cli(write_config(folder, tiny_edit, cache))
    return folder


@pytest.mark.parametrize("name", ["lora.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_a_checkpoint_damaged_with_its_size_kept_fails_verification(four_steps, tmp_path, name):
    """Only the sha256 sees this: the size is the manifest's and the file still loads."""
    ckpt = tmp_path / "step-000004"
    shutil.copytree(four_steps / "out/checkpoints/step-000004", ckpt)
    assert train.verify_checkpoint(ckpt) is None
    size = (ckpt / name).stat().st_size
    flip_last_bytes(ckpt / name)
    assert (ckpt / name).stat().st_size == size
    load_file(str(ckpt / name))  # still a readable file: nothing but the checksum can tell
    problem = train.verify_checkpoint(ckpt)
    assert problem is not None and name in problem, problem


def test_a_same_size_corruption_of_the_newest_checkpoint_resumes_from_the_one_before(
    tiny_edit, cache, four_steps, tmp_path
):
    """Step 4's LoRA damaged in place: the resume starts from step 2 and makes step 4 again, exactly
    as it was; the damaged checkpoint is moved aside, not used and not deleted."""
    folder = tmp_path / "run"
    shutil.copytree(four_steps, folder)
    cfg = write_config(folder, tiny_edit, cache)  # the same run, its output here
    checkpoints = folder / "out/checkpoints"
    good = lora_file(checkpoints / "step-000004", "lora.safetensors")
    flip_last_bytes(checkpoints / "step-000004/lora.safetensors")
    damaged = lora_file(checkpoints / "step-000004", "lora.safetensors")
    train_cli(cfg, max_train_steps=6)
    assert max_diff(lora_file(checkpoints / "step-000004", "lora.safetensors"), good) == 0
    aside = list((folder / "out").glob("superseded-*/checkpoints/step-000004"))
    assert len(aside) == 1 and max_diff(lora_file(aside[0], "lora.safetensors"), damaged) == 0
    assert [r["step"] for r in log_rows(folder / "out")] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_beyond_the_limit_rotate_out_oldest_first(tiny_edit, cache, tmp_path):
    cfg = write_config(tmp_path, tiny_edit, cache, checkpointing_steps=1, checkpoints_total_limit=2)
    train_cli(cfg)
    kept = sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir())
    assert kept == ["step-000003", "step-000004"], kept


# --------------------------------------------------------------------------------------------------
# Non-finite gradients and clipping


class InfiniteGradient(torch.autograd.Function):
    """0 in the forward pass (the loss stays finite), an infinite gradient for `w` backwards."""

    @staticmethod
    def forward(ctx, w):
        ctx.shape = w.shape
        return w.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, math.inf)


def test_an_infinite_gradient_with_a_finite_loss_is_never_applied(
    tiny_edit, cache, tmp_path, monkeypatch
):
    """Step 4's loss is finite but one LoRA weight's gradient is inf: the run stops at step 4 naming
    the gradient norm, step 4 is in no checkpoint and no log line, and the shared LoRA is finite."""
    cfg = write_config(tmp_path, tiny_edit, cache, max_train_steps=6, checkpointing_steps=1)
    real = train.batch_loss

    def inf_grad_at_step_4(transformer, batch, rows, step, *args):
        loss = real(transformer, batch, rows, step, *args)
        if step == 3:
            w = next(p for p in transformer.parameters() if p.requires_grad)
            loss = loss + InfiniteGradient.apply(w)
        return loss

    monkeypatch.setattr(train, "batch_loss", inf_grad_at_step_4)
    message = fails([cfg])
    assert "(gradient norm inf) at step 4: it was not applied" in message, message
    loss = float(message.split("the loss is ")[1].split(" ")[0])
    assert math.isfinite(loss), message
    assert [r["step"] for r in log_rows(tmp_path / "out")] == [1, 2, 3]
    assert not list((tmp_path / "out/checkpoints").glob("step-000004*"))
    shared = lora_file(tmp_path / "out")
    assert all(torch.isfinite(v).all() for v in shared.values())


def test_the_applied_gradient_is_clipped_to_max_grad_norm(tiny_edit, cache, tmp_path, monkeypatch):
    """AdamW steps with a gradient of norm min(logged norm, max_grad_norm); 0 is no clipping."""
    seen, real_step = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        seen.append(
            torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            ).item()
        )
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    for limit in (0.01, 0.0):
        seen.clear()
        folder = tmp_path / str(limit)
        train.main(
            [str(write_config(folder, tiny_edit, cache, max_grad_norm=limit, max_train_steps=3))]
        )
        logged = [r["grad_norm"] for r in log_rows(folder / "out")]
        assert min(logged) > 0.01, logged  # every step is clipped at 0.01
        want = [min(n, limit or math.inf) for n in logged]
        assert seen == pytest.approx(want, rel=1e-4), (limit, seen, want)


# --------------------------------------------------------------------------------------------------
# Caption dropout


def dropped_fraction(monkeypatch, p: float, n: int = 2000, rows: int = 200) -> tuple[float, bool]:
    """(the fraction of n samples batch_loss gave the empty instruction, whether every sample kept
    its reference), with caption_dropout_probability = p and the model replaced by a recorder."""
    drops, kept = [], []

    def record(transformer, x0, ref, text, sigma, noise):
        drops.append(text[:, 0, 0] == 0)  # the empty instruction is zeros here, the caption ones
        kept.append(ref is not None and bool((ref == 2).all()))
        return torch.zeros(())

    batch = {
        "target": torch.zeros(rows, 16, 2, 2),
        "reference": torch.full((rows, 16, 2, 2), 2.0),
        "text": torch.ones(rows, 3, 8),
        "text_empty": torch.zeros(rows, 3, 8),
        "first": 0,
        "bucket": (16, 16),
    }
    cfg = config.Config(seed=0, caption_dropout_probability=p)
    sched = {
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "base_shift": 0.5,
        "max_shift": 1.15,
    }
    monkeypatch.setattr(train, "flow_loss", record)
    for step in range(n // rows):
        train.batch_loss(None, batch, slice(0, rows), step, cfg, sched, torch.device("cpu"))
    return torch.cat(drops).float().mean().item(), all(kept)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_caption_dropout_drops_as_often_as_configured_and_keeps_the_reference(p, monkeypatch):
    """Over 2000 samples the empty instruction's share is p within 0.03 (5 standard errors at 0.5);
    the reference is passed unchanged whether or not the caption is dropped (SPEC §6)."""
    rate, reference_kept = dropped_fraction(monkeypatch, p)
    assert abs(rate - p) <= 0.03, f"dropped {rate:.3f} of the captions, configured {p}"
    assert reference_kept


# --------------------------------------------------------------------------------------------------
# Resume with LoRA dropout: exact only because the RNG state is restored


def forge_rng(checkpoint: Path) -> None:
    """Put a fresh RNG state in a checkpoint, the manifest updated so that it still verifies."""
    from safetensors.torch import save_file

    save_file(
        {"torch": torch.Generator().manual_seed(12345).get_state()},
        str(checkpoint / "rng.safetensors"),
    )
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    f = checkpoint / "rng.safetensors"
    manifest["files"][f.name] = {
        "bytes": f.stat().st_size,
        "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
    }
    (checkpoint / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert train.verify_checkpoint(checkpoint) is None


def test_a_resume_with_lora_dropout_is_exact_and_depends_on_the_restored_rng(
    tiny_edit, cache, tmp_path
):
    """lora_dropout draws from torch's global RNG: a run stopped at step 3 and started again (a new
    process) ends where a straight run ends, and the same resume from another RNG state does not."""
    keys = dict(lora_dropout=0.3, checkpointing_steps=3)
    train_cli(write_config(tmp_path / "straight", tiny_edit, cache, max_train_steps=6, **keys))
    resumed = write_config(tmp_path / "resumed", tiny_edit, cache, max_train_steps=3, **keys)
    train_cli(resumed)
    shutil.copytree(tmp_path / "resumed/out", tmp_path / "forged/out")
    forged = write_config(tmp_path / "forged", tiny_edit, cache, max_train_steps=3, **keys)
    forge_rng(tmp_path / "forged/out/checkpoints/step-000003")
    train_cli(resumed, max_train_steps=6)
    train_cli(forged, max_train_steps=6)
    straight = lora_file(tmp_path / "straight/out")
    assert max_diff(straight, lora_file(tmp_path / "resumed/out")) == 0
    assert log_rows(tmp_path / "straight/out") == log_rows(tmp_path / "resumed/out")
    assert max_diff(straight, lora_file(tmp_path / "forged/out")) > 0, (
        "the RNG state made no difference"
    )


# --------------------------------------------------------------------------------------------------
# Learning rate


def test_warmup_starts_at_lr_over_warmup_steps_and_reaches_lr_on_its_last_step(
    tiny_edit, cache, tmp_path
):
    """lr_warmup_steps = 4, cosine over 7 steps: the logged rates are lr * (1/4, 2/4, 3/4, 1), then
    lr * (1 + cos(pi t)) / 2 at t = 0, 1/3, 2/3; and the first update, AdamW's lr * sign(g) on a B
    that starts at 0, is lr / 4 in size: the rate logged is the rate applied."""
    lr = 1e-3
    cfg = write_config(
        tmp_path,
        tiny_edit,
        cache,
        lr_scheduler="cosine",
        lr_warmup_steps=4,
        max_train_steps=7,
        checkpointing_steps=1,
        checkpoints_total_limit=0,
    )
    train_cli(cfg)
    cosine = [0.5 * (1 + math.cos(math.pi * t)) for t in (0, 1 / 3, 2 / 3)]
    want = [lr * f for f in [1 / 4, 2 / 4, 3 / 4, 1, *cosine]]
    got = [r["lr"] for r in log_rows(tmp_path / "out")]
    assert got == pytest.approx(want, rel=1e-9), got
    first = lora_file(tmp_path / "out/checkpoints/step-000001", "lora.safetensors")
    size = max(v.abs().max().item() for k, v in first.items() if "lora_B" in k)
    assert size == pytest.approx(lr / 4, rel=1e-3), size


@pytest.mark.parametrize(
    "scheduler,values",
    [
        # steps 0-1 warmup (1/2, 1), then t = (step - 2) / 8 over steps 2..10
        ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 6: 1.0, 9: 1.0, 10: 1.0}),
        ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.5, 9: 1 / 8, 10: 0.0}),
        (
            "cosine",
            {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.5, 9: 0.5 * (1 + math.cos(math.pi * 7 / 8)), 10: 0.0},
        ),
    ],
)
def test_lr_factor_warmup_and_decay_end_values(scheduler, values):
    cfg = config.Config(lr_scheduler=scheduler, lr_warmup_steps=2, max_train_steps=10)
    got = {step: train.lr_factor(step, cfg) for step in values}
    assert got == pytest.approx(values, abs=1e-12), got
