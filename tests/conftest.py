"""Shared fixtures: tiny random LongCat checkpoints in the released folder layout, and diffusers'
pipelines built on the same files (diffusers is the oracle; it is never imported by minicat itself).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_edit(tmp_path_factory) -> Path:
    return tiny.write(tmp_path_factory.mktemp("ckpt") / "tiny-edit", "edit", seed=0)


@pytest.fixture(scope="session")
def tiny_t2i(tmp_path_factory) -> Path:
    return tiny.write(tmp_path_factory.mktemp("ckpt") / "tiny-t2i", "t2i", seed=1)


class VLProcessor:
    """Stands in for Qwen2VLProcessor (which needs torchvision); the pipelines use only
    .image_processor."""

    def __init__(self, image_processor):
        self.image_processor = image_processor


def diffusers_pipeline(path: Path, dtype=None):
    """diffusers' LongCatImageEditPipeline / LongCatImagePipeline on the files of a checkpoint
    folder."""
    import torch
    import transformers
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        LongCatImageEditPipeline,
        LongCatImagePipeline,
        LongCatImageTransformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    dtype = dtype or torch.float32
    proc = (
        getattr(transformers, "Qwen2VLImageProcessorPil", None)
        or transformers.Qwen2VLImageProcessor
    )
    cls = LongCatImageEditPipeline if M.read_flavour(path) == "edit" else LongCatImagePipeline
    return cls(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path / "text_encoder", dtype=dtype
        ),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        text_processor=VLProcessor(proc.from_pretrained(path / "text_processor")),
        transformer=LongCatImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=dtype
        ),
    )


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run_script(*args, cwd=None, check=True, env=None) -> subprocess.CompletedProcess:
    """Run one of minicat's scripts as a user would; returns the finished process (output captured)."""
    env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def flags(**kw) -> list[str]:
    """Command-line flags from keywords: negative_prompt="x" -> --negative-prompt x, True -> the
    bare flag, False -> nothing, a list -> the flag once per item (--lora a --lora b)."""
    out = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            for item in value if isinstance(value, (list, tuple)) else [value]:
                out += [flag, str(item)]
    return out


def validate_cli(check=True, cwd=None, **kw) -> subprocess.CompletedProcess:
    """`python validate.py --key value ...` as a user types it."""
    return run_script(ROOT / "validate.py", *flags(**kw), cwd=cwd, check=check)


def train_cli(config, *extra, check=True, env=None, **keys) -> subprocess.CompletedProcess:
    """`python train.py config.toml --key=value ...` as a user types it."""
    overrides = [f"--{k}={v}" for k, v in keys.items()]
    return run_script(ROOT / "train.py", config, *extra, *overrides, check=check, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """The run failed with a single `error:` line containing every needle, and no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode != 0, f"expected a failure, got rc 0:\n{proc.stdout[-1000:]}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


class ToyBlock(nn.Module):
    """A toy block carrying LongCat's module names (attn.to_q, attn.to_out.0, ff.net.0.proj,
    ff.net.2)."""

    def __init__(self, d: int):
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q, self.attn.to_out = nn.Linear(d, d), nn.ModuleList([nn.Linear(d, d)])
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)])
        self.ff.net[0].proj = nn.Linear(d, 4 * d)

    def forward(self, x):
        x = x + self.attn.to_out[0](F.gelu(self.attn.to_q(x)))
        return x + self.ff.net[2](self.ff.net[1](self.ff.net[0].proj(x)))
