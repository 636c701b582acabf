"""LoRA training for LongCat-Image-Edit (and the text-to-image LongCat-Image), in one visible loop:

    python train.py config.toml [--key=value ...]
    torchrun --nproc_per_node=N train.py config.toml          # data parallel; rank 0 writes and prints
    python train.py examples/tiny.toml                         # a tiny random model, on CPU, in a minute

The recipe is the official one (SPEC §6; meituan-longcat/LongCat-Image train_examples/edit_lora): latents and
prompt embeddings are cached first (data.py), then per sample sigma = sigmoid(N(0, 1)) shifted like the
sampler's schedule, x_t = (1 - sigma) x0 + sigma eps, the reference tokens ride along clean with modality 2,
and the loss is the MSE between the predicted velocity on the target tokens and eps - x0 (rectified flow,
Liu et al. 2022; Esser et al. 2024; cloneofsimo/minRF). Only the LoRA (lora.py) trains; the base may be
int8/fp8 (quant.py). Each sample's noise comes from (seed, step, its place in the global batch), so N
processes train exactly as one process on the same global batch, and a resume needs no noise state.

Nothing is continued from what is not verified: a checkpoint counts once its manifest (sizes and sha256 of
its files, written last) checks out and it belongs to this run (model, LoRA shape, data); a step whose loss
or gradient is not finite is never applied or saved. Stopping at step k and starting again ends
bit-identical to a straight run on CPU. Files are written aside and moved into place; an output_dir is
locked by the run using it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
import lora
import model as M
import quant
import validate

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

try:
    import fcntl
except ImportError:  # Windows: no output_dir lock
    fcntl = None


# ----------------------------------------------------------------------------------------------------------
# Config: every key of config.toml, checked before any work


@dataclass
class Config:
    """config.toml's keys (SimpleTuner's names where one exists); defaults are the official recipe's."""

    # folder, hub id, or "tiny" / "tiny-t2i"
    pretrained_model_name_or_path: str = "meituan-longcat/LongCat-Image-Edit"
    # edit | final | dev; "" = what the checkpoint is
    model_flavour: str = ""
    # no_change | int8 | fp8 | fp8-compute (int8-quanto, fp8-torchao are aliases)
    base_model_precision: str = "int8"
    # the text encoder while caching: no_change | int8 | fp8
    text_encoder_precision: str = "no_change"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: list(lora.DEFAULT_TARGETS))
    lora_dropout: float = 0.0
    output_dir: str = "output"
    # start over in an output_dir holding another run (its files are moved aside, never deleted)
    overwrite_output_dir: bool = False
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    # constant | cosine | linear (after the warmup)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 2000
    # > 0: stop after this many epochs if that comes first
    num_train_epochs: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    checkpointing_steps: int = 250
    checkpoints_total_limit: int = 3
    # latest | none | a checkpoint folder
    resume_from_checkpoint: str = "latest"
    seed: int = 0
    # bf16: the base and activations in bfloat16 on a GPU (LoRA weights and AdamW stay float32) | no
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    # keep attention outputs through checkpointing: faster at large sizes, more memory
    checkpoint_keep_attention: bool = False
    # auto | flash | efficient | cudnn | math (auto never uses cuDNN where a backward pass runs)
    attention_backend: str = "auto"
    # torch.compile each block (regional: two compiles)
    compile: bool = False
    # stream the first N blocks' frozen weights from CPU memory (needs gradient_checkpointing)
    offload_blocks: int = 0
    # the empty instruction this often, the reference kept
    caption_dropout_probability: float = 0.1
    flow_schedule_auto_shift: bool = True
    # with auto shift off and > 0: a static shift s
    flow_schedule_shift: float = 0.0
    flow_use_uniform_schedule: bool = False
    # 0 = no validation images
    validation_steps: int = 0
    # default: the first pair's instruction and reference
    validation_prompt: str | list = ""
    validation_reference: str | list = ""
    validation_negative_prompt: str = ""
    validation_guidance: float = 4.5
    validation_num_inference_steps: int = 40
    validation_resolution: str = "768x768"
    validation_seed: int = 0
    # > 0: also show the decoded image every N sampler steps in the grid
    validation_preview_steps: int = 0
    # auto | cpu | cuda | cuda:N | mps
    device: str = "auto"
    aspect_bucket_alignment: int = 64
    datasets: list = field(default_factory=list)

    def check(self) -> None:
        """Every value within its range; a ValueError names the key and what it accepts."""
        at_least = dict(lora_rank=1, train_batch_size=1, gradient_accumulation_steps=1, max_train_steps=1,
                        checkpointing_steps=1, checkpoints_total_limit=0, num_train_epochs=0, lr_warmup_steps=0,
                        validation_steps=0, validation_num_inference_steps=1, validation_seed=0, seed=0,
                        validation_preview_steps=0, offload_blocks=0)  # fmt: skip
        for key, low in at_least.items():
            if not low <= getattr(self, key) < 2**62:
                raise ValueError(f"{key} = {getattr(self, key)}: must be at least {low}")
        for key, (low, high, ends) in RANGES.items():
            v = getattr(self, key)
            above = v >= low if ends[0] == "[" else v > low
            below = v <= high if ends[1] == "]" else v < high
            if not (math.isfinite(v) and above and below):
                raise ValueError(f"{key} = {v}: must be in {ends[0]}{low}, {high}{ends[1]}")
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(
                    f"{key} = {getattr(self, key)!r}: choose one of {', '.join(c for c in choices if c)}"
                )
        for key, compute in (("base_model_precision", True), ("text_encoder_precision", False)):
            try:
                quant.normalize_mode(getattr(self, key), compute=compute)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        validate.parse_size(self.validation_resolution, "validation_resolution")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"lora_targets = {self.lora_targets!r}: a list of module-name suffixes")
        if self.offload_blocks and not self.gradient_checkpointing:
            raise ValueError(
                "offload_blocks needs gradient_checkpointing = true (else every block stays resident)"
            )
        self.validation_prompt, self.validation_reference = (
            as_list(self.validation_prompt),
            as_list(self.validation_reference),
        )
        if self.validation_reference and len(self.validation_reference) != len(self.validation_prompt):
            raise ValueError("validation_prompt and validation_reference need the same number of entries")


CHOICES = {
    "lr_scheduler": ("constant", "cosine", "linear"),
    "mixed_precision": ("bf16", "no"),
    "model_flavour": ("", "edit", "final", "dev"),
    "attention_backend": tuple(M.ATTENTION_CHOICES),
}
# Float keys: (low, high, which ends are allowed: "[" / "]" included, "(" / ")" not).
RANGES = {"learning_rate": (0, 1, "(]"), "lora_alpha": (0, 1e6, "(]"), "adam_epsilon": (0, 1, "(]"),
          "lora_dropout": (0, 1, "[)"), "adam_beta1": (0, 1, "[)"), "adam_beta2": (0, 1, "[)"),
          "caption_dropout_probability": (0, 1, "[]"), "adam_weight_decay": (0, 10, "[]"),
          "max_grad_norm": (0, 1e6, "[]"), "flow_schedule_shift": (0, 100, "[]"),
          "validation_guidance": (0, 100, "[]")}  # fmt: skip
# What makes two runs the same run: resuming across a change of any of these would mix two trainings.
RUN_KEYS = ("model_flavour", "lora_rank", "lora_alpha", "lora_targets", "train_batch_size",
            "gradient_accumulation_steps", "seed", "aspect_bucket_alignment")  # fmt: skip
TRAIN_KNOBS = ('base_model_precision = "int8", text_encoder_precision = "int8", a smaller dataset resolution, '
               "a lower lora_rank, checkpoint_keep_attention = false, train_batch_size = 1 or offload_blocks = N")  # fmt: skip
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def as_list(v) -> list[str]:
    return [v] if isinstance(v, str) and v else ([] if isinstance(v, str) else list(v))


def check_type(key: str, value, where: str):
    """The value, checked against the field's type (an int is a fine float); raises naming the key."""
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        raise ValueError(
            f"{where}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
        )
    want = typing.get_type_hints(Config)[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
        names = " or ".join(t.__name__ for t in typing.get_args(want)) or want.__name__
        raise ValueError(f"{where}: {key} should be {names}, got {value!r}")
    return value


def parse_override(arg: str) -> tuple[str, object]:
    """--key=value, the value read as TOML when it parses (numbers, true/false, lists), else as a string."""
    if not arg.startswith("--") or "=" not in arg:
        raise ValueError(f"command line: {arg!r} is not --key=value")
    key, text = arg[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if key in FIELDS and FIELDS[key].type == "str" and not isinstance(value, str):
        value = text  # e.g. --output_dir=2024
    return key, value


def load_config(path: Path, overrides: list[str]) -> Config:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    values = {k: check_type(k, v, str(path)) for k, v in raw.items()}
    for k, v in map(parse_override, overrides):
        values[k] = check_type(k, v, "command line")
    cfg = Config(**values)
    cfg.check()
    return cfg


# ----------------------------------------------------------------------------------------------------------
# The recipe


def sample_sigmas(n: int, tokens: int, sched: dict, g: torch.Generator, cfg: Config) -> torch.Tensor:
    """Training noise levels [n]: logit-normal (or uniform), then shifted as the sampler's schedule is."""
    sigma = (
        torch.rand(n, generator=g)
        if cfg.flow_use_uniform_schedule
        else torch.sigmoid(torch.randn(n, generator=g))
    )
    if cfg.flow_schedule_auto_shift:
        return M.time_shift(M.shift_mu(tokens, sched), sigma)
    return M.static_shift(cfg.flow_schedule_shift, sigma) if cfg.flow_schedule_shift > 0 else sigma


def flow_loss(transformer, x0, reference, text, sigma, noise) -> torch.Tensor:
    """Rectified flow on one batch: x_t = (1 - s) x0 + s eps; the model predicts eps - x0 on the target
    tokens, with the clean reference tokens appended (modality 2). x0, reference, noise [B, 16, h, w] and
    sigma [B] in float32, text [B, L, D]; inputs cast to the model's dtype, the MSE in float32."""
    B, _, h, w = x0.shape
    s = sigma[:, None, None, None]
    tokens, ids = M.pack((1 - s) * x0 + s * noise), M.image_ids(h // 2, w // 2, text.shape[1], 1, x0.device)
    if reference is not None:
        tokens = torch.cat([tokens, M.pack(reference)], dim=1)  # (B, 2N, 64)
        ids = torch.cat([ids, M.image_ids(h // 2, w // 2, text.shape[1], 2, x0.device)])
    dtype = transformer.x_embedder.weight.dtype
    pred = transformer(
        tokens.to(dtype), text.to(dtype), sigma.to(dtype), ids, M.text_ids(text.shape[1], x0.device)
    )
    target = M.pack(noise - x0)  # (B, N, 64)
    return F.mse_loss(pred[:, : target.shape[1]].float(), target.float())


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of one sample at one step, from (seed, step, its place in the global batch): every
    process and every resume draws the same numbers for it."""
    digest = hashlib.sha256(f"minicat-{seed}-{step}-{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def batch_loss(
    transformer, batch: dict, rows: slice, step: int, cfg: Config, sched: dict, device
) -> torch.Tensor:
    """The loss of some rows of a batch; each row draws its caption dropout, sigma and noise from its own
    generator, on the CPU, so any device and any split of the global batch gets the same numbers."""
    x0 = batch["target"][rows]  # (b, 16, h, w)
    drop, sigma, noise = torch.zeros(len(x0), dtype=torch.bool), torch.zeros(len(x0)), torch.empty(x0.shape)
    for i in range(len(x0)):
        g = sample_generator(cfg.seed, step, batch["first"] + rows.start + i)
        drop[i] = torch.rand(1, generator=g)[0] < cfg.caption_dropout_probability  # caption dropout
        sigma[i] = sample_sigmas(1, (x0.shape[2] // 2) * (x0.shape[3] // 2), sched, g, cfg)[0]
        noise[i] = torch.randn(x0.shape[1:], generator=g)
    text = torch.where(drop[:, None, None], batch["text_empty"][rows], batch["text"][rows])  # (b, L, D)
    ref = None if batch["reference"] is None else batch["reference"][rows].to(device)
    return flow_loss(transformer, x0.to(device), ref, text.to(device), sigma.to(device), noise.to(device))


def lr_factor(step: int, cfg: Config) -> float:
    """Warmup, then constant / cosine / linear decay to 0 at max_train_steps."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    t = (step - cfg.lr_warmup_steps) / max(1, cfg.max_train_steps - cfg.lr_warmup_steps)
    return {"constant": 1.0, "linear": 1 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t))}[cfg.lr_scheduler]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: complete and verified, or not used; never mixed across runs; moved aside, never deleted


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(out: Path, step: int, transformer, opt, loader, cfg: Config, run: dict) -> Path:
    """checkpoints/step-NNNNNN: the LoRA as trained and as shared, AdamW states, RNG, loader position, run
    identity, and last a manifest of every file's size and sha256. Also refreshes the shared LoRA file in
    output_dir and removes this run's oldest checkpoints beyond checkpoints_total_limit."""
    final = out / "checkpoints" / f"step-{step:06d}"
    if final.exists():  # left by a run this one does not continue from
        move_aside([final], "superseded")
    names = {p: n for n, p in transformer.named_parameters() if p.requires_grad}
    states = {f"{names[p]}.{k}": v.contiguous() for p, st in opt.state.items() for k, v in st.items()}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        lora.save_lora(tmp / "lora.safetensors", transformer, metadata={"step": step}, fold=False)
        lora.save_lora(tmp / "pytorch_lora_weights.safetensors", transformer, metadata={"step": step})
        save_file(states, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {"step": step, "loader": loader.state_dict(), "run": run, "config": dataclasses.asdict(cfg)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        files = {f.name: {"bytes": f.stat().st_size, "sha256": file_digest(f)} for f in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=2))

    data.write_atomic(final, write, "the checkpoint ")
    done = [p for p, _ in checkpoints(out)]
    for old in done[: max(0, len(done) - cfg.checkpoints_total_limit)] if cfg.checkpoints_total_limit else []:
        shutil.rmtree(old)  # this run's own, verified, beyond the limit the config asks for
    shared = out / "pytorch_lora_weights.safetensors"
    data.write_atomic(shared, lambda tmp: shutil.copyfile(final / shared.name, tmp), "the LoRA ")
    return final


def verify_checkpoint(path: Path, run: dict | None = None) -> str | None:
    """None when the checkpoint is complete, intact and (given `run`) of this run; else what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for name, f in manifest["files"].items():
            if (path / name).stat().st_size != f["bytes"] or file_digest(path / name) != f["sha256"]:
                return f"{name} is damaged (its size or sha256 differs from the manifest)"
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError as e:
        return f"incomplete ({Path(e.filename).name} is missing)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    diff = [
        k
        for k in sorted(set(run or {}) | set(state.get("run", {})))
        if run and state["run"].get(k) != run.get(k)
    ]
    if diff:
        return f"from another run ({diff[0]}: {state['run'].get(diff[0])!r} there, {run.get(diff[0])!r} now)"
    return None


def checkpoints(out: Path) -> list[tuple[Path, int]]:
    """(folder, step) of every checkpoints/step-NNNNNN folder, oldest first (not checked)."""
    found = [(p, p.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*") if p.is_dir()]
    return sorted(((p, int(s)) for p, s in found if s.isdigit()), key=lambda ps: ps[1])


def move_aside(paths: list[Path], why: str) -> None:
    """Rename each to `<name>.<why>-<time>` beside it: out of the way of this run, and kept."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for p in paths:
        p.rename(p.with_name(f"{p.name}.{why}-{stamp}"))


def choose_resume(out: Path, cfg: Config, run: dict) -> tuple[Path | None, list[str]]:
    """The checkpoint to continue from, and warnings: the one named (refused unless it verifies and is of
    this run), or with "latest" the newest that verifies (those skipped are named). Checkpoints after it,
    which this run would write again, are moved aside."""
    notes, chosen = [], None
    if cfg.resume_from_checkpoint not in ("latest", "none"):
        chosen = Path(cfg.resume_from_checkpoint).expanduser().resolve()
        if problem := verify_checkpoint(chosen, run):
            raise ValueError(f"resume_from_checkpoint: {chosen} is {problem}; choose another, or none")
    elif cfg.resume_from_checkpoint == "latest":
        for path, _ in reversed(checkpoints(out)):
            if (problem := verify_checkpoint(path, run)) is None:
                chosen = path
                break
            notes.append(f"checkpoint {path} is {problem}: skipped, moved aside")
    step = json.loads((chosen / "state.json").read_text())["step"] if chosen is not None else 0
    move_aside([p for p, s in checkpoints(out) if s > step], "superseded")
    return chosen, notes


def load_checkpoint(path: Path, transformer, loader) -> tuple[int, dict]:
    """LoRA weights and RNG into place (before the optimizer is built); returns (step, AdamW states)."""
    lora.load_lora(transformer, path / "lora.safetensors")
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    state = json.loads((path / "state.json").read_text())
    loader.load_state_dict(state["loader"])
    return state["step"], load_file(str(path / "optimizer.safetensors"))


class OutputLock:
    """output_dir/.lock, held (flock) for the whole run: a second run on the folder stops at once, naming the
    first. The kernel releases the lock when its process dies, so a killed run's lock is simply taken over."""

    def __init__(self, out: Path):
        self.out, self.fh = out, None

    def __enter__(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.out / ".lock", "a+")
        if fcntl is not None:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.fh.seek(0)
                holder = self.fh.read().strip() or "another process"
                self.fh.close()
                raise ValueError(
                    f"output_dir {self.out} is in use by {holder}; wait for it or use another output_dir"
                ) from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        self.fh.close()  # closing releases the flock


def start_over(out: Path, run: dict, cfg: Config) -> None:
    """Refuse to mix two trainings in one output_dir; with overwrite_output_dir the old run's files are
    moved aside. A longer run or new validation settings are the same run."""
    old = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else run
    diff = [k for k in sorted(set(old) | set(run)) if old.get(k) != run.get(k)]
    if not diff:
        return
    if not cfg.overwrite_output_dir:
        raise ValueError(
            f"output_dir {out} holds another run ({diff[0]}: {old.get(diff[0])!r} there, {run.get(diff[0])!r} "
            "now): choose another output_dir, or set overwrite_output_dir = true to start over (the old run's "
            "files are moved aside)"
        )
    names = (
        "checkpoints",
        "validation",
        "loss.jsonl",
        "loss.png",
        "pytorch_lora_weights.safetensors",
        "run.json",
    )
    move_aside([out / n for n in names if (out / n).exists()], "old")


class LossLog:
    """loss.jsonl, one line per optimizer step; on resume cut back to the resumed step, so a resumed log
    equals a straight run's and the loss curve has one point per step."""

    def __init__(self, path: Path, step: int):
        self.path = path
        rows = self.rows()
        if len(rows) != step or any(r["step"] > step for r in rows):
            kept = "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
            data.write_atomic(path, lambda tmp: tmp.write_text(kept), "the loss log ")

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = {}
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[row["step"]] = row
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
        return [rows[s] for s in sorted(rows)]

    def add(self, row: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise ValueError(f"{self.path}: cannot write ({e.strerror or e}); free disk space") from None


# ----------------------------------------------------------------------------------------------------------
# Pictures: validation grids with their captions, the loss curve with its axes (Pillow only)


def font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def wrap(draw, text: str, width: float, face) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and draw.textlength(f"{line} {word}", font=face) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines or [""]


def validation_grid(rows: list[tuple[str, list[tuple[str, object]]]]):
    """One row per validation prompt: its caption (prompt, step, seed, guidance) above, then labelled
    images (reference | previews | result), each at the result's size."""
    from PIL import Image, ImageDraw

    face, small = font(15), font(12)
    w, h = max((row[-1][1].size for _, row in rows), key=lambda s: s[0] * s[1])
    cols = max(len(row) for _, row in rows)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [wrap(probe, caption, cols * w - 12, face) for caption, _ in rows]
    heights = [20 * len(t) + 10 + 16 + h for t in texts]
    grid = Image.new("RGB", (cols * w, sum(heights)), "white")
    draw, y = ImageDraw.Draw(grid), 0
    for (_, row), lines, height in zip(rows, texts, heights, strict=True):
        for i, line in enumerate(lines):
            draw.text((6, y + 5 + 20 * i), line, fill="black", font=face)
        top = y + 20 * len(lines) + 10
        for j, (label, image) in enumerate(row):
            draw.text((j * w + 4, top), label, fill=(90, 90, 90), font=small)
            grid.paste(image.resize((w, h)), (j * w, top + 16))
        y += height
    return grid


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    span = (hi - lo) or abs(hi) or 1.0
    unit = 10 ** math.floor(math.log10(span / n))
    unit *= next(m for m in (1, 2, 5, 10) if span / (unit * m) <= n)
    first = math.ceil(lo / unit - 1e-9) * unit
    return [first + i * unit for i in range(int((hi - first) / unit + 1e-9) + 1)]


def plot_losses(rows: list[dict], png: Path) -> None:
    """loss.png: the loss at every step (light), its running mean (dark) on the left axis, the learning
    rate (orange) on the right axis, steps along the bottom."""
    from PIL import Image, ImageDraw

    if len(rows) < 2:
        return
    W, H, left, right, top, bottom = 900, 440, 74, 78, 34, 46
    steps, losses, lrs = ([r[k] for r in rows] for k in ("step", "loss", "lr"))
    smooth, acc = [], losses[0]
    for v in losses:
        acc = 0.9 * acc + 0.1 * v
        smooth.append(acc)
    lo, hi, lr_hi = min(losses), max(losses), max(lrs) or 1.0
    pad = 0.05 * ((hi - lo) or abs(hi) or 1.0)
    lo, hi = lo - pad, hi + pad

    def x(s: float) -> float:
        return left + (s - steps[0]) / ((steps[-1] - steps[0]) or 1) * (W - left - right)

    def y(v: float, v0: float = lo, v1: float = hi) -> float:
        return H - bottom - (v - v0) / ((v1 - v0) or 1) * (H - top - bottom)

    img = Image.new("RGB", (W, H), "white")
    d, face = ImageDraw.Draw(img), font(12)
    d.rectangle([left, top, W - right, H - bottom], outline=(120, 120, 120))
    for s in nice_ticks(steps[0], steps[-1], 8):
        d.line([(x(s), H - bottom), (x(s), H - bottom + 4)], fill="black")
        d.text((x(s) - 10, H - bottom + 6), f"{s:g}", fill="black", font=face)
    for v in nice_ticks(lo, hi, 6):
        d.line([(left - 4, y(v)), (W - right, y(v))], fill=(225, 225, 225))
        d.text((4, y(v) - 7), f"{v:.4g}", fill="black", font=face)
    for v in nice_ticks(0.0, lr_hi, 5):
        d.text((W - right + 6, y(v, 0.0, lr_hi) - 7), f"{v:.2g}", fill=(200, 110, 0), font=face)
    d.line([(x(s), y(v)) for s, v in zip(steps, losses, strict=True)], fill=(170, 190, 230), width=1)
    d.line([(x(s), y(v)) for s, v in zip(steps, smooth, strict=True)], fill=(20, 60, 160), width=2)
    d.line([(x(s), y(v, 0.0, lr_hi)) for s, v in zip(steps, lrs, strict=True)], fill=(230, 140, 20), width=1)
    title = f"loss {losses[0]:.4f} -> {smooth[-1]:.4f} (running mean), steps {steps[0]}-{steps[-1]}"
    d.text((left, 10), title + "; learning rate in orange, right axis", fill="black", font=face)
    d.text((W // 2 - 14, H - 20), "step", fill="black", font=face)
    data.write_atomic(png, lambda tmp: img.save(tmp, format="PNG"), "the loss curve ")


# ----------------------------------------------------------------------------------------------------------
# The run


def run_identity(cfg: Config, ckpt: Path, world: int) -> dict:
    """What a checkpoint must share to be continued: the model, the LoRA's shape, the data and the batch
    (not where the caches live: entries are named by content)."""
    sets = [{k: v for k, v in d.items() if not k.startswith("cache_dir")} for d in cfg.datasets]
    run = {k: getattr(cfg, k) for k in RUN_KEYS} | {"model": data.model_identity(ckpt), "world_size": world}
    return run | {"datasets": json.loads(json.dumps(sets, default=str))}


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun sets WORLD_SIZE/RANK/LOCAL_RANK (NCCL across GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, validate.pick_device(device, "device =")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return dist.get_rank(), world, torch.device("cuda", torch.cuda.current_device())
    return dist.get_rank(), world, torch.device("cpu")


def read_data(cfg: Config, cfg_dir: Path) -> tuple[Path, list, list, list, list]:
    """(checkpoint, datasets, samples, notes, validation set): every data problem surfaces here, first, then
    those of the checkpoint (its folder and flavour; no model is loaded)."""
    datasets = data.parse_datasets(cfg.datasets, cfg_dir, cfg.aspect_bucket_alignment)
    notes = []
    samples = data.scan(datasets, notes)
    ckpt = validate.resolve_checkpoint(cfg.pretrained_model_name_or_path, cfg_dir)
    flavour = validate.read_flavour(ckpt)
    if cfg.model_flavour and (cfg.model_flavour == "edit") != (flavour == "edit"):
        raise ValueError(f"model_flavour = {cfg.model_flavour!r}, but {ckpt} is a {flavour} checkpoint")
    cfg.model_flavour = cfg.model_flavour or ("edit" if flavour == "edit" else "final")
    if wrong := [
        d.id for d in datasets if d.role != "reference" and (d.role == "edit") != (flavour == "edit")
    ]:
        why = "edit sets (with conditioning_data) need LongCat-Image-Edit, t2i sets LongCat-Image"
        raise data.DataError(
            [f"dataset(s) {', '.join(wrong)} do not fit the {flavour} checkpoint {ckpt}: {why}"]
        )
    return ckpt, datasets, samples, notes, validation_set(cfg, cfg_dir, samples, flavour)


def validation_set(cfg: Config, cfg_dir: Path, samples: list, flavour: str) -> list[dict]:
    """The validation prompts with their references read (as training reads images) at validation size."""
    from PIL import Image

    if cfg.validation_steps == 0:
        return []
    size = validate.parse_size(cfg.validation_resolution, "validation_resolution")
    prompts, refs = cfg.validation_prompt, cfg.validation_reference
    if not prompts:  # the first pair of the (edit) dataset
        prompts, refs = [samples[0].captions[0]], [str(samples[0].reference)] if samples[0].reference else []
    if flavour == "edit" and not refs:
        raise ValueError("validation_prompt is set but validation_reference is not: an edit needs an image")
    val = []
    for i, prompt in enumerate(prompts):
        ref = data.load_rgb(cfg_dir / refs[i], key="validation_reference") if refs else None
        val.append(
            {"prompt": prompt, "ref_image": ref.resize(size, Image.LANCZOS) if ref else None, "size": size}
        )
    return val


def prepare_data(cfg, ckpt, datasets, samples, notes, val, rank, device) -> validate.Models:
    """The caches (rank 0 writes, the others check) and the validation inputs, with each encoder loaded at
    most once: the VAE for every latent first, then the text encoder for every text, which is then freed;
    the VAE stays, on the CPU, for validation decoding."""
    models = validate.Models(
        ckpt, device, validate.default_dtype(device), te_quant=cfg.text_encoder_precision
    )
    te, dtype = quant.normalize_mode(cfg.text_encoder_precision), str(models.dtype).removeprefix("torch.")

    def latent(x: torch.Tensor) -> torch.Tensor:
        return M.to_latent(models.vae(), x.to(device)).cpu()

    def text(prompt: str, ref) -> torch.Tensor:
        return models.text_encoder().encode(prompt, ref).cpu()

    ident = data.model_identity(ckpt)
    with validate.stage("caching latents and prompts", TRAIN_KNOBS):
        for v in val:
            v["ref_latent"] = latent(data.pil_to_tensor(v["ref_image"])) if v["ref_image"] else None
        if rank == 0:
            print(
                data.build_caches(
                    datasets, latent, text, ident, dtype, te, samples=samples, notes=notes
                ).summary()
            )
        if dist.is_initialized():
            dist.barrier()
        if rank != 0:  # the entries rank 0 wrote (a check only)
            data.build_caches(datasets, None, None, ident, dtype, te, progress=False, samples=samples)
        for v in val:  # the negative prompt sees the same reference
            v["txt"], v["neg"] = text(v["prompt"], v["ref_image"]), None
            if cfg.validation_guidance > 1:
                v["neg"] = text(cfg.validation_negative_prompt, v["ref_image"])
    models.drop("text_encoder")
    models.park()
    return models


def build_transformer(cfg: Config, ckpt: Path, device: torch.device):
    """The base (quantized while it loads) with a float32 LoRA on top; only the LoRA trains."""
    dtype = torch.bfloat16 if device.type != "cpu" and cfg.mixed_precision == "bf16" else torch.float32
    quant.check_device(quant.normalize_mode(cfg.base_model_precision), device)
    where = "cpu" if cfg.offload_blocks else device  # offloaded blocks stay in (pinned) CPU memory
    with validate.stage("loading the transformer", TRAIN_KNOBS):
        transformer = M.load_transformer(
            ckpt, dtype, where, convert=validate.quantizer(cfg.base_model_precision)
        )
    transformer.gradient_checkpointing = cfg.gradient_checkpointing
    transformer.checkpoint_keep_attention = cfg.checkpoint_keep_attention
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
    lora.inject_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    lora.mark_only_lora_as_trainable(transformer)
    if cfg.offload_blocks:
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        transformer.offload = quant.offload_blocks(blocks, cfg.offload_blocks, device)
    with validate.stage("moving the transformer to the GPU", TRAIN_KNOBS):
        transformer.to(device)
    if cfg.compile:
        transformer.compile_blocks()
    return transformer.train(), [p for p in transformer.parameters() if p.requires_grad]


def build_optimizer(cfg: Config, transformer, params: list, states: dict) -> torch.optim.AdamW:
    """AdamW on the LoRA, built after any checkpoint's LoRA is in place, with its states if resuming."""
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)  # fmt: skip
    for name, p in transformer.named_parameters():
        if p.requires_grad and f"{name}.exp_avg" in states:
            # AdamW keeps `step` on the CPU unless capturable
            opt.state[p] = {
                k: states[f"{name}.{k}"].to("cpu" if k == "step" else p.device)
                for k in ("step", "exp_avg", "exp_avg_sq")
            }
    return opt


def train_step(
    transformer, batch: dict, step: int, cfg: Config, sched: dict, params: list, device
) -> tuple[float, float]:
    """Forward and backward over the batch's micro-batches, gradients averaged over ranks and clipped;
    returns (loss, gradient norm before clipping). Nothing is applied yet."""
    B, A = cfg.train_batch_size, cfg.gradient_accumulation_steps
    total = 0.0
    for k in range(A):
        loss = batch_loss(transformer, batch, slice(k * B, (k + 1) * B), step, cfg, sched, device) / A
        loss.backward()
        total += loss.item()
    if dist.is_initialized():  # data parallel: average the LoRA gradients and the loss over ranks
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        t = torch.tensor([total], device=device)
        dist.all_reduce(t)
        total = t.item() / dist.get_world_size()
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    return total, float(norm)


def run_validation(
    transformer, models: validate.Models, val: list, cfg: Config, step: int, out: Path
) -> None:
    """validation/step-NNNNNN.png: each prompt sampled with validation_seed (the training RNG is untouched)."""
    vae, rows = models.vae(), []
    transformer.eval()
    for v in val:
        s = validate.Settings(v["size"], cfg.validation_seed, cfg.validation_num_inference_steps,
                              cfg.validation_guidance, cfg.validation_negative_prompt,
                              preview_every=cfg.validation_preview_steps)  # fmt: skip
        ref = v["ref_latent"].to(models.device) if v["ref_latent"] is not None else None
        with validate.stage(f"validation at step {step}", TRAIN_KNOBS):
            image, previews = validate.generate(
                transformer, vae, v["txt"], v["neg"], models.sched, s, ref, progress=False
            )
        images = [("reference", v["ref_image"])] if v["ref_image"] else []
        images += [(f"sampler step {k}", im) for k, im in previews] + [("result", image)]
        rows.append((f"{v['prompt']}  |  training step {step}, seed {s.seed}, guidance {s.guidance}", images))
    transformer.train()
    models.park()
    grid, path = validation_grid(rows), out / "validation" / f"step-{step:06d}.png"
    data.write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"), "the validation grid ")


def stop_non_finite(out: Path, step: int, loss: float, norm: float, run: dict) -> FloatingPointError:
    """The error for a step whose loss or gradient is not finite. The checkpoint of the step before holds
    the weights that gave it, so it is moved aside; the one named is the newest whose weights gave a finite
    loss, and the shared LoRA file is set back to it."""
    bad = [p for p, s in checkpoints(out) if s >= step]
    move_aside(bad, "nonfinite")
    good = next((p for p, _ in reversed(checkpoints(out)) if verify_checkpoint(p, run) is None), None)
    if good is not None:
        shared = out / "pytorch_lora_weights.safetensors"
        data.write_atomic(shared, lambda tmp: shutil.copyfile(good / shared.name, tmp), "the LoRA ")
    return FloatingPointError(
        f"the loss is {loss} (gradient norm {norm}) at step {step + 1}: it was not applied; the last good "
        f"checkpoint is {good or 'none'}"
        + (f" ({', '.join(p.name for p in bad)} moved aside)" if bad else "")
        + "; try a lower learning_rate or max_grad_norm, or check the data"
    )


def train(cfg: Config, cfg_dir: Path, prepare_only: bool = False) -> torch.nn.Module | None:
    """The whole run; returns the transformer with its trained LoRA (on every rank)."""
    rank, world, device = setup_distributed(cfg.device)
    ckpt, datasets, samples, notes, val = read_data(cfg, cfg_dir)
    validate.check_attention_backend(cfg.attention_backend, device, torch.float32 if device.type == "cpu" else torch.bfloat16,
                                     M.read_json(ckpt / "transformer/config.json").get("attention_head_dim", 128),
                                     grad=True, key="attention_backend =")  # fmt: skip
    if prepare_only:
        return prepare_data(cfg, ckpt, datasets, samples, notes, [], rank, device) and None
    out = (cfg_dir / Path(cfg.output_dir).expanduser()).resolve()
    run = run_identity(cfg, ckpt, world)
    with OutputLock(out) if rank == 0 else nullcontext():
        if rank == 0:
            start_over(out, run, cfg)
        resume, warnings = choose_resume(out, cfg, run) if rank == 0 else (None, [])
        if dist.is_initialized():
            dist.barrier()
            resume = [resume]
            dist.broadcast_object_list(resume)
            resume = resume[0]
        return run_training(
            cfg, ckpt, out, run, resume, warnings, datasets, samples, notes, val, rank, world, device
        )


def run_training(cfg, ckpt, out, run, resume, warnings, datasets, samples, notes, val, rank, world, device):
    main = rank == 0
    models = prepare_data(cfg, ckpt, datasets, samples, notes, val, rank, device)
    transformer, params = build_transformer(cfg, ckpt, device)
    loader = data.Loader(
        samples, cfg.train_batch_size * cfg.gradient_accumulation_steps, cfg.seed, rank, world
    )
    step, states = load_checkpoint(resume, transformer, loader) if resume is not None else (0, {})
    opt = build_optimizer(cfg, transformer, params, states)
    sched, max_steps = models.sched, cfg.max_train_steps
    if cfg.num_train_epochs > 0:
        max_steps = min(max_steps, cfg.num_train_epochs * len(loader))
    log = None
    if main:
        for w in warnings:
            print(f"warning: {w}")
        if resume is not None:
            print(f"resumed from {resume} at step {step}")
        data.write_atomic(out / "run.json", lambda tmp: tmp.write_text(json.dumps(run, indent=2)), "")
        config = json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
        data.write_atomic(out / "config.json", lambda tmp: tmp.write_text(config), "")
        log = LossLog(out / "loss.jsonl", step)
        print(f"{sum(p.numel() for p in params):,} LoRA parameters; {len(samples)} samples, {len(loader)} "
              f"steps per epoch; training steps {step} -> {max_steps} on {device} x {world}")  # fmt: skip
        if val and step == 0:
            run_validation(transformer, models, val, cfg, 0, out)

    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=step, desc="training", disable=not main, dynamic_ncols=True)
    last = resume
    for batch in loader:
        if step >= max_steps:
            break
        opt.zero_grad(set_to_none=True)
        where = (
            f"training step {step + 1} ({'x'.join(map(str, batch['bucket']))}, batch {cfg.train_batch_size})"
        )
        with validate.stage(where, f"{TRAIN_KNOBS}; the last checkpoint, {last or 'none yet'}, is kept"):
            loss, norm = train_step(transformer, batch, step, cfg, sched, params, device)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise (
                stop_non_finite(out, step, loss, norm, run) if main else FloatingPointError("non-finite loss")
            )
        lr = cfg.learning_rate * lr_factor(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        step += 1
        if main:
            log.add({"step": step, "loss": loss, "lr": lr, "grad_norm": norm})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update()
            if step % cfg.checkpointing_steps == 0 or step == max_steps:
                last = save_checkpoint(out, step, transformer, opt, loader, cfg, run)
                plot_losses(log.rows(), out / "loss.png")
            if val and (step % cfg.validation_steps == 0 or step == max_steps):
                run_validation(transformer, models, val, cfg, step, out)
    bar.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if main:
        print(
            f"wrote {out / 'pytorch_lora_weights.safetensors'} (step {step}); loss curve {out / 'loss.png'}"
        )
    return transformer


def main(argv: list[str] | None = None, prepare_only: bool = False) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python train.py config.toml [--key=value ...]   (keys: see config.toml and README)")
    try:
        train(load_config(Path(argv[0]), argv[1:]), Path(argv[0]).resolve().parent, prepare_only)
    # DataError, CheckpointError and OutOfMemory are ValueErrors: a message per line, no traceback
    except (ValueError, FloatingPointError, OSError) as e:
        sys.exit("\n".join(f"error: {line}" for line in str(e).splitlines()))
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command again to resume from the last checkpoint")


if __name__ == "__main__":
    main()
