"""LoRA training for LongCat-Image-Edit (and the text-to-image LongCat-Image), in one visible loop:

    python train.py config.toml [--key=value ...]
    torchrun --nproc_per_node=N train.py config.toml          # data parallel; rank 0 writes and prints
    python train.py examples/tiny.toml                         # a tiny random model, on a CPU

The recipe is the official one (meituan-longcat/LongCat-Image train_examples/edit_lora): latents and
prompt embeddings are cached first (data.py), then per sample sigma = sigmoid(N(0, 1)) shifted like
the sampler's schedule, x_t = (1 - sigma) x0 + sigma eps, the reference tokens ride along clean with
modality 2, and the loss is the MSE between the predicted velocity on the target tokens and eps - x0
(rectified flow, Liu et al. 2022; Esser et al. 2024; cloneofsimo/minRF). Only the LoRA (lora.py)
trains; the base may be int8/fp8 (quant.py). Each sample's noise comes from (seed, step, its place
in the global batch), so N processes train exactly as one process on the same global batch, and a
resume needs no noise state.

Nothing is continued from what is not verified: a checkpoint counts once its manifest (sizes and
sha256 of its files, written last) checks out and it belongs to this run (model, LoRA shape, data);
a step whose loss or gradient is not finite is never applied or saved. Stopping at step k and
starting again ends bit-identical to a straight run on CPU. Files are written aside and moved into
place; an output_dir is locked by the run using it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import config
import data
import files
import images
import lora
import model as M
import pipeline

try:
    import fcntl
except ImportError:  # Windows: no output_dir lock
    fcntl = None

# What makes two runs the same run: resuming across a change of any of these would mix two
# trainings. The adapter's type and settings are among them (a LoRA is never resumed as a LoKr);
# run_identity adds the lycoris_config's contents.
RUN_KEYS = (
    "model_flavour lora_type lora_rank lora_alpha lora_targets train_batch_size "
    "gradient_accumulation_steps seed aspect_bucket_alignment"
).split()
EMA_FILE = "pytorch_lora_weights_ema.safetensors"  # the EMA adapter, shared like the LoRA file
# --------------------------------------------------------------------------------------------------
# The recipe


def sample_sigmas(
    n: int, tokens: int, sched: dict, g, uniform=False, auto_shift=True, shift=0.0
) -> torch.Tensor:
    """Training noise levels [n]: logit-normal (or uniform), then shifted as the sampler's schedule
    is (the scheduler's mu for this many tokens) or by a static shift."""
    sigma = torch.rand(n, generator=g) if uniform else torch.sigmoid(torch.randn(n, generator=g))
    if auto_shift:
        return M.time_shift(M.shift_mu(tokens, sched), sigma)
    return M.static_shift(shift, sigma) if shift > 0 else sigma


def flow_loss(transformer, x0, reference, text, sigma, noise, mask=None) -> torch.Tensor:
    """Rectified flow on one batch: x_t = (1 - s) x0 + s eps; the model predicts eps - x0 on the
    target tokens, with the clean reference tokens appended (model.image_sequence: reference k at
    modality 2 + k). x0, noise [B, 16, h, w] and sigma [B] in float32; reference None, one [B, 16,
    h, w] or a list of them; text [B, L, D]; mask None or loss weights [B, N] per target token;
    inputs cast to the model's dtype, the MSE in float32."""
    s = sigma[:, None, None, None]
    noisy = (1 - s) * x0 + s * noise
    references = (
        [] if reference is None else reference if isinstance(reference, list) else [reference]
    )
    tokens, img_ids, txt_ids = M.image_sequence(noisy, references, text.shape[1])
    # an adapter may wrap x_embedder (LyCORIS's whole-model preset): the base layer's dtype
    dtype = getattr(transformer.x_embedder, "base", transformer.x_embedder).weight.dtype
    pred = transformer(tokens.to(dtype), text.to(dtype), sigma.to(dtype), img_ids, txt_ids)
    target = M.pack(noise - x0)  # (B, N, 64)
    if mask is None:
        return F.mse_loss(pred[:, : target.shape[1]].float(), target.float())
    # masked loss: the mask-weighted mean; a token of weight 0 gets exactly no gradient
    err = (pred[:, : target.shape[1]].float() - target.float()) ** 2  # (B, N, 64)
    weights = mask.float()[:, :, None].expand_as(err)  # (B, N, 64)
    return (err * weights).sum() / weights.sum().clamp_min(1e-12)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of one sample at one step, from (seed, step, its place in the global batch):
    every process and every resume draws the same numbers for it."""
    digest = hashlib.sha256(f"minicat-{seed}-{step}-{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def batch_loss(
    transformer, batch: dict, rows: slice, step: int, cfg: config.Config, sched: dict, device
) -> torch.Tensor:
    """The loss of some rows of a batch; each row draws its caption dropout, sigma and noise from
    its own generator, on the CPU, so any device and any split of the global batch gets the same
    numbers."""
    x0 = batch["target"][rows]  # (b, 16, h, w)
    tokens = (x0.shape[2] // 2) * (x0.shape[3] // 2)
    schedule = (
        cfg.flow_use_uniform_schedule,
        cfg.flow_schedule_auto_shift,
        cfg.flow_schedule_shift,
    )
    drop, sigma, noise = (
        torch.zeros(len(x0), dtype=torch.bool),
        torch.zeros(len(x0)),
        torch.empty(x0.shape),
    )
    for i in range(len(x0)):
        g = sample_generator(cfg.seed, step, batch["first"] + rows.start + i)
        drop[i] = torch.rand(1, generator=g)[0] < cfg.caption_dropout_probability  # caption dropout
        sigma[i] = sample_sigmas(1, tokens, sched, g, *schedule)[0]
        noise[i] = torch.randn(x0.shape[1:], generator=g)
    text = torch.where(
        drop[:, None, None], batch["text_empty"][rows], batch["text"][rows]
    )  # (b, L, D)
    ref = batch["reference"]
    if isinstance(ref, list):  # several references, each (b, 16, h, w)
        ref = [r[rows].to(device) for r in ref]
    elif ref is not None:
        ref = ref[rows].to(device)  # (b, 16, h, w)
    args = (transformer, x0.to(device), ref, text.to(device), sigma.to(device), noise.to(device))
    if batch.get("mask") is None:
        return flow_loss(*args)
    return flow_loss(*args, mask=batch["mask"][rows].to(device))


def lr_factor(step: int, cfg: config.Config) -> float:
    """Warmup, then constant / cosine / linear decay to 0 at max_train_steps, or polynomial decay
    to lr_end (diffusers' get_scheduler and SimpleTuner's custom_schedule.py, with its lr_end and
    lr_power). SimpleTuner's constant_with_warmup and cosine_with_warmup are constant and cosine,
    which warm up too. The warmup differs from diffusers' step / warmup on purpose: (step + 1) /
    warmup never spends a step at learning rate 0, and reaches the full rate at the warmup's end."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    t = (step - cfg.lr_warmup_steps) / max(1, cfg.max_train_steps - cfg.lr_warmup_steps)
    t = min(t, 1.0)
    kind = cfg.lr_scheduler.removesuffix("_with_warmup")
    if kind == "polynomial":
        end = cfg.lr_end / cfg.learning_rate
        return (1 - end) * (1 - t) ** cfg.lr_power + end
    return {"constant": 1.0, "linear": 1 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t))}[kind]


# --------------------------------------------------------------------------------------------------
# EMA of the adapter (issue 21): SimpleTuner's use_ema / ema_decay / ema_update_interval, with the
# decay of diffusers' EMAModel (training_utils.py, get_decay without warmup): the n-th update
# uses min(ema_decay, n / (9 + n)) after a first update that copies the weights.


class AdapterEMA:
    """A float32 shadow of every trainable tensor, by parameter name, and how many updates made it."""

    def __init__(self, transformer, decay: float, updates: int = 0, shadow: dict | None = None):
        self.params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        self.decay, self.updates = decay, updates
        if shadow is None:
            shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.shadow = {n: t.to(self.params[n].device) for n, t in shadow.items()}
        assert self.shadow.keys() == self.params.keys(), sorted(self.shadow.keys() ^ self.params)

    def rate(self) -> float:
        """The decay of the next update (diffusers' EMAModel: 0, then (1 + s) / (10 + s))."""
        s = self.updates  # diffusers' optimization_step - 1, before its increment
        return 0.0 if s == 0 else min(self.decay, (1 + s) / (10 + s))

    @torch.no_grad()
    def update(self) -> None:
        keep = self.rate()
        for name, p in self.params.items():
            shadow = self.shadow[name]
            shadow.sub_((1 - keep) * (shadow - p.detach().float()))  # diffusers' arithmetic
        self.updates += 1

    @contextmanager
    def applied(self):
        """The transformer with the EMA weights in place of the trained ones, then restored."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])


@contextmanager
def showing(transformer, ema: AdapterEMA | None, version: str):
    """The transformer as validation_show's `version`: base (adapters at 0), trained or ema."""
    if version == "ema":
        with ema.applied():
            yield
    elif version == "base":
        lora.set_lora_scale(transformer, 0.0)
        try:
            yield
        finally:
            lora.set_lora_scale(transformer, 1.0)
    else:
        yield


# --------------------------------------------------------------------------------------------------
# Checkpoints: complete and verified, or not used; never mixed across runs; moved aside, never deleted


# what every checkpoint holds besides state.json and manifest.json
CHECKPOINT_FILES = (
    "lora.safetensors",
    "pytorch_lora_weights.safetensors",
    "optimizer.safetensors",
    "rng.safetensors",
)


def save_checkpoint(
    out: Path, step: int, transformer, opt, loader, cfg: config.Config, run: dict, ema=None
) -> Path:
    """checkpoints/step-NNNNNN: the LoRA as trained and as shared, AdamW states, RNG, loader
    position, run identity, and last a manifest of every file's size and sha256. Also refreshes the
    shared LoRA file in output_dir and removes this run's oldest checkpoints beyond
    checkpoints_total_limit."""
    final = out / "checkpoints" / f"step-{step:06d}"
    if final.exists():  # left by a run this one does not continue from
        files.move_aside([final], "superseded")
    names = {p: n for n, p in transformer.named_parameters() if p.requires_grad}
    states = {
        f"{names[p]}.{k}": v.contiguous() for p, st in opt.state.items() for k, v in st.items()
    }

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        lora.save_lora(tmp / "lora.safetensors", transformer, metadata={"step": step}, fold=False)
        lora.save_lora(
            tmp / "pytorch_lora_weights.safetensors", transformer, metadata={"step": step}
        )
        save_file(states, str(tmp / "optimizer.safetensors"))
        save_file(rng_states(transformer), str(tmp / "rng.safetensors"))
        state = {
            "step": step,
            "loader": loader.state_dict(),
            "run": run,
            "config": dataclasses.asdict(cfg),
        }
        if ema is not None:  # the shadow as kept, and as shared (the LoRA file's format)
            save_file({n: t.cpu() for n, t in ema.shadow.items()}, str(tmp / "ema.safetensors"))
            state["ema_updates"] = ema.updates
            with ema.applied():
                lora.save_lora(tmp / EMA_FILE, transformer, metadata={"step": step})
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        listing = {
            f.name: {"bytes": f.stat().st_size, "sha256": files.file_digest(f)}
            for f in sorted(tmp.iterdir())
        }
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": listing}, indent=2))

    files.write_atomic(final, write, "the checkpoint ")
    rotate_checkpoints(out, cfg.checkpoints_total_limit, run)
    share_checkpoint(out, final)
    return final


def share_checkpoint(out: Path, checkpoint: Path) -> None:
    """output_dir's pytorch_lora_weights.safetensors (and the EMA's) as the checkpoint holds them."""
    shared = out / "pytorch_lora_weights.safetensors"
    files.write_atomic(shared, partial(shutil.copyfile, checkpoint / shared.name), "the LoRA ")
    if (checkpoint / EMA_FILE).exists():
        files.write_atomic(
            out / EMA_FILE, partial(shutil.copyfile, checkpoint / EMA_FILE), "the EMA "
        )


def rng_states(transformer) -> dict[str, torch.Tensor]:
    """The random states a resume must restore: the CPU generator's and, on a GPU, the generator of
    the device the LoRA lives on (lora_dropout draws there)."""
    states = {"torch": torch.get_rng_state()}
    device = next(transformer.parameters()).device  # x_embedder, never offloaded
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, torch.Tensor], transformer) -> None:
    torch.set_rng_state(states["torch"])
    device = next(transformer.parameters()).device  # x_embedder, never offloaded
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def verify_checkpoint(path: Path, run: dict | None = None) -> str | None:
    """None when the checkpoint is complete, intact and (given `run`) of this run; else what is
    wrong. Its manifest must list every file a resume reads (and the EMA's, where state.json
    counts EMA updates)."""
    if not path.is_dir():
        return "not there (no such folder)"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        listed = manifest["files"]
        needed = [*CHECKPOINT_FILES, "state.json"]
        if "state.json" in listed and "ema_updates" in json.loads(
            (path / "state.json").read_text()
        ):
            needed += ["ema.safetensors", EMA_FILE]
        if unlisted := [n for n in needed if n not in listed]:
            return f"incomplete (its manifest.json does not list {', '.join(unlisted)})"
        for name, f in listed.items():
            size_differs = (path / name).stat().st_size != f["bytes"]
            if size_differs or files.file_digest(path / name) != f["sha256"]:
                return f"{name} is damaged (its size or sha256 differs from the manifest)"
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError as e:
        return f"incomplete ({Path(e.filename).name} is missing)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    theirs = comparable(state.get("run", {}))
    diff = [k for k in sorted(run or {}) if theirs.get(k) != run[k]]
    if diff:
        there = theirs.get(diff[0])
        return f"from another run ({diff[0]}: {there!r} there, {run.get(diff[0])!r} now)"
    return None


def checkpoints(out: Path) -> list[tuple[Path, int]]:
    """(folder, step) of every checkpoints/step-NNNNNN folder, oldest first (not checked)."""
    found = [
        (p, p.name.removeprefix("step-"))
        for p in (out / "checkpoints").glob("step-*")
        if p.is_dir()
    ]
    return sorted(((p, int(s)) for p, s in found if s.isdigit()), key=lambda ps: ps[1])


def rotate_checkpoints(out: Path, limit: int, run: dict) -> list[Path]:
    """Remove this run's oldest checkpoints beyond `limit` (0: keep all). Only checkpoints that
    verify as this run's count and go; anything else in checkpoints/ (another run's, a damaged
    one, a folder put there by hand) is left where it is and named once. Returns what was left."""
    if not limit:
        return []
    ours = []
    others = []
    for path, _ in checkpoints(out):
        if verify_checkpoint(path, run) is None:
            ours.append(path)
        else:
            others.append(path)
    for old in ours[: max(0, len(ours) - limit)]:
        shutil.rmtree(old)
    for path in others:
        warn_once(f"{path} is not a verified checkpoint of this run: left in place, not rotated")
    return others


def validation_grids(out: Path) -> list[tuple[Path, int]]:
    """(file, step) of every validation/step-NNNNNN.png, oldest first."""
    found = [(p, p.stem.removeprefix("step-")) for p in (out / "validation").glob("step-*.png")]
    return sorted(((p, int(s)) for p, s in found if s.isdigit()), key=lambda ps: ps[1])


# What a run writes beside its checkpoints; an earlier run's copies are kept when it is superseded.
HISTORY = (
    "loss.jsonl",
    "loss.png",
    "config.json",
    "run.json",
    "data.json",
    "pytorch_lora_weights.safetensors",
    EMA_FILE,
)


def supersede(out: Path, step: int) -> Path | None:
    """Everything an earlier run in `out` wrote after `step`, which this run will write again, goes
    aside together into out/superseded-<time>/: its later checkpoints and validation grids (all of
    them when starting at step 0) are moved there, and the history files (loss log and curve,
    config.json, run.json, the shared LoRA) are copied there as they were (moved, when starting at
    step 0), so nothing is overwritten or cut. Returns that folder, or None when nothing came after
    `step`."""
    later = [p for p, s in checkpoints(out) if s > step]
    grids = [p for p, s in validation_grids(out) if s > step or step == 0]
    rows = LossLog.read(out / "loss.jsonl")
    history = [out / n for n in HISTORY if (out / n).exists()]
    started_over = step == 0 and bool(rows or history)
    if not (later or grids or any(r["step"] > step for r in rows) or started_over):
        return None
    aside = out / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        n += 1
        aside = out / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    for path in later:
        (aside / "checkpoints").mkdir(parents=True, exist_ok=True)
        path.rename(aside / "checkpoints" / path.name)
    for path in grids:
        (aside / "validation").mkdir(parents=True, exist_ok=True)
        path.rename(aside / "validation" / path.name)
    aside.mkdir(parents=True, exist_ok=True)
    for path in history:  # moved when starting over, so a failed restart leaves no second copy
        if step == 0:
            path.rename(aside / path.name)
        else:
            shutil.copy2(path, aside / path.name)
    return aside


def check_output_dir(out: Path, datasets: list, ckpt: Path, config_file: Path | None) -> None:
    """Refuse an output_dir inside a dataset's image or cache folder, or holding one: its pictures
    and checkpoints would become training data (or orphans) on the next run. Refuse one inside the
    model's folder (its files are the model's identity) and one where the run would overwrite the
    config file it was started with (SimpleTuner's config.json with output_dir "."), unless that
    file is a config.json an earlier minicat run wrote there."""
    ckpt = ckpt.resolve()
    if out == ckpt or ckpt in out.parents:
        raise ValueError(
            f"output_dir {out} is inside the model checkpoint {ckpt}: choose an output_dir "
            "outside it (its files are what the model is)"
        )
    if config_file is not None and config_file.resolve().parent == out:
        name = config_file.name
        ours = name == "config.json" and minicat_wrote(config_file)
        if name in (*HISTORY, "manifest.json") and not ours:
            raise ValueError(
                f"output_dir {out} holds the config file {config_file}, and training writes its "
                f"own {name} there: choose another output_dir (a subfolder, as SimpleTuner's "
                "output/models)"
            )
    for ds in datasets:
        folders = {
            "instance_data_dir": ds.instance_data_dir,
            "cache_dir_vae": ds.cache_dir_vae,
            "cache_dir_text": ds.cache_dir_text,
        }
        for key, folder in folders.items():
            folder = Path(folder).resolve()
            if out == folder or folder in out.parents:
                where = "is"
            elif out in folder.parents:
                where = "holds"
            else:
                continue
            inside = "inside" if where == "is" else "the folder of"
            raise ValueError(
                f"output_dir {out} {where} {inside} dataset '{ds.id}' {key} {folder}: choose an "
                "output_dir outside your data and caches"
            )


def minicat_wrote(path: Path) -> bool:
    """Whether a config.json is the resolved config a minicat run writes: every key of Config and
    no other."""
    try:
        keys = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    fields = {f.name for f in dataclasses.fields(config.Config)}
    return isinstance(keys, dict) and set(keys) == fields


def remove_leftovers(out: Path) -> None:
    """Remove the temporaries (`NAME.tmp-HOST-PID`) that killed runs of this machine left in the
    output folder, and say so; a live writer's, another machine's and every other name stay."""
    found = []
    for folder in (out, out / "checkpoints", out / "validation"):
        found += files.remove_stale_temporaries(folder)
    if found:
        names = ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "")
        print(f"removed {len(found)} leftover(s) of killed runs: {names}")


def warn_once(message: str, said: set = set()) -> None:  # noqa: B006 - the set is the memory
    if message not in said:
        said.add(message)
        print(f"warning: {message}")


def choose_resume(
    out: Path, cfg: config.Config, run: dict, max_steps: tuple[int, str]
) -> tuple[Path | None, list[str]]:
    """The checkpoint to continue from, and warnings: the one named (refused unless it verifies and
    is of this run), or with "latest" the newest that verifies (those skipped are named). A
    checkpoint past the last step (max_steps: the step and the key that sets it) is refused:
    continuing would hand back a longer run than the config asks for. What an earlier run wrote
    past the chosen step goes aside (supersede)."""
    notes = []
    chosen = None
    if cfg.resume_from_checkpoint not in ("latest", "none"):
        chosen = Path(cfg.resume_from_checkpoint).expanduser().resolve()
        if problem := verify_checkpoint(chosen, run):
            raise ValueError(
                f"resume_from_checkpoint: {chosen} is {problem}; choose another, or none"
            )
    elif cfg.resume_from_checkpoint == "latest":
        for path, _ in reversed(checkpoints(out)):
            if (problem := verify_checkpoint(path, run)) is None:
                chosen = path
                break
            notes.append(f"checkpoint {path} is {problem}: skipped, moved aside")
    step = 0
    if chosen is not None:
        step = json.loads((chosen / "state.json").read_text())["step"]
    last, key = max_steps
    if step > last:
        raise ValueError(
            f"{key} ends the run at step {last}, but {chosen} is at step {step}: raise "
            f"{key.split()[0]} to go on, or set resume_from_checkpoint to a checkpoint at or before "
            f"step {last} (or none) to train again from there; later checkpoints are "
            "then moved aside, never deleted"
        )
    aside = supersede(out, step)
    if aside is not None:
        notes.append(f"what the earlier run wrote after step {step} is kept in {aside}")
    return chosen, notes


def load_checkpoint(path: Path, transformer, loader) -> tuple[int, dict]:
    """LoRA weights and RNG into place (before the optimizer is built); returns (step, AdamW states)."""
    lora.load_lora(transformer, path / "lora.safetensors")
    restore_rng_states(load_file(str(path / "rng.safetensors")), transformer)
    state = json.loads((path / "state.json").read_text())
    loader.load_state_dict(state["loader"])
    return state["step"], load_file(str(path / "optimizer.safetensors"))


def load_ema(path: Path | None, transformer, cfg: config.Config) -> AdapterEMA | None:
    """The EMA (use_ema): a checkpoint's shadow and update count, or a fresh one from the weights in
    place (a new run, or a checkpoint written without use_ema: said so)."""
    if not cfg.use_ema:
        return None
    if path is not None and (path / "ema.safetensors").exists():
        updates = json.loads((path / "state.json").read_text())["ema_updates"]
        shadow = load_file(str(path / "ema.safetensors"))
        return AdapterEMA(transformer, cfg.ema_decay, updates, shadow)
    if path is not None:
        print(f"warning: {path} has no EMA (written without use_ema): it starts from these weights")
    return AdapterEMA(transformer, cfg.ema_decay)


class OutputLock:
    """output_dir/.lock, held (flock) for the whole run: a second run on the folder stops at once,
    naming the first. The kernel releases the lock when its process dies, so a killed run's lock is
    simply taken over."""

    def __init__(self, out: Path):
        self.out, self.fh = out, None

    def __enter__(self):
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output_dir {self.out} is a file: choose a folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.out / ".lock", "a+")
        except OSError as e:
            raise ValueError(
                f"output_dir {self.out}: cannot write there ({e.strerror or e}): choose a folder "
                "you can write, or fix its permissions"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.fh.seek(0)
                holder = self.fh.read().strip() or "another process"
                self.fh.close()
                raise ValueError(
                    f"output_dir {self.out} is in use by {holder}; wait for it or use another "
                    "output_dir"
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


def read_record(path: Path, what: str) -> dict:
    """A JSON object minicat wrote (run.json, data.json); a damaged one is a ValueError naming it."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is damaged (not the JSON object {what} holds)")
    return record


def start_over(out: Path, run: dict, cfg: config.Config) -> None:
    """Refuse to mix two trainings in one output_dir; with overwrite_output_dir the old run's files
    are moved aside. A longer run or new validation settings are the same run."""
    old = run
    if (out / "run.json").exists():
        try:
            old = read_record(out / "run.json", "run.json")
        except ValueError as e:
            if not cfg.overwrite_output_dir:
                raise ValueError(
                    f"{e}: set overwrite_output_dir = true to start over (the old run's files "
                    "move aside), or choose another output_dir"
                ) from None
            old = {"run.json": "damaged"}
    old = comparable(old)
    diff = [k for k in sorted(set(old) | set(run)) if old.get(k) != run.get(k)]
    if not diff:
        if cfg.overwrite_output_dir and (out / "run.json").exists():
            print(
                f"note: overwrite_output_dir = true, but {out} holds this same run: it goes on "
                "as resume_from_checkpoint says (none starts it over, keeping the old files)"
            )
        return
    if not cfg.overwrite_output_dir:
        was = old.get(diff[0])
        now = run.get(diff[0])
        raise ValueError(
            f"output_dir {out} holds another run ({diff[0]}: {was!r} there, {now!r} now): choose "
            "another output_dir, or set overwrite_output_dir = true to start over (the old run's "
            "files move aside)"
        )
    names = [
        "checkpoints",
        "validation",
        "loss.jsonl",
        "loss.png",
        "pytorch_lora_weights.safetensors",
        EMA_FILE,
        "run.json",
        "config.json",
        "data.json",
        "logs",
    ]
    files.move_aside([out / n for n in names if (out / n).exists()], "old")


class Tracker:
    """report_to (SimpleTuner's key; rank 0 only): "tensorboard" writes event files under
    output_dir/logs/<tracker_project_name>/<tracker_run_name>; "wandb" starts a run as WANDB_MODE
    and the user's own wandb settings say (never a login); "none" (the default) sends nothing
    anywhere. Scalars go as train/loss, train/lr, train/grad_norm; grids as validation."""

    def __init__(self, cfg: config.Config, out: Path):
        self.kind, self.writer, self.run = cfg.report_to, None, None
        name = cfg.tracker_run_name or out.name
        if self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "report_to = 'tensorboard' needs its package: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(out / "logs" / cfg.tracker_project_name / name))
        elif self.kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise ValueError(
                    "report_to = 'wandb' needs its package: pip install wandb"
                ) from None
            config_ = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
            self.run = wandb.init(
                project=cfg.tracker_project_name, name=name, dir=str(out), config=config_
            )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def image(self, step: int, grid) -> None:
        if self.writer is not None:
            pixels = np.array(grid.convert("RGB"))  # (H, W, 3) uint8
            self.writer.add_image("validation", pixels, step, dataformats="HWC")
        if self.run is not None:
            import wandb

            self.run.log({"validation": wandb.Image(grid)}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


class LossLog:
    """loss.jsonl, one line per optimizer step; on resume cut back to the resumed step, so a resumed
    log equals a straight run's and the loss curve has one point per step. A line cut short (a
    kill, a full disk) is dropped then, so the next row starts on a line of its own."""

    def __init__(self, path: Path, step: int):
        self.path = path
        kept = "".join(json.dumps(r) + "\n" for r in self.rows() if r["step"] <= step)
        if (path.read_text(errors="replace") if path.exists() else "") != kept:
            files.write_atomic(path, lambda tmp: tmp.write_text(kept), "the loss log ")

    def rows(self) -> list[dict]:
        return self.read(self.path)

    @staticmethod
    def read(path: Path) -> list[dict]:
        """The rows of a loss log, one per step (the last line for a step wins; a line cut short by a
        kill is skipped)."""
        if not path.exists():
            return []
        rows = {}
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                rows[row["step"]] = row
            except (ValueError, KeyError, TypeError):
                continue
        return [rows[s] for s in sorted(rows)]

    def add(self, row: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise ValueError(
                f"{self.path}: cannot write ({e.strerror or e}); free disk space"
            ) from None


# --------------------------------------------------------------------------------------------------
# The run


def run_identity(cfg: config.Config, ckpt: Path, world: int) -> dict:
    """What a checkpoint must share to be continued: the model, the LoRA's shape, the data and the
    batch (not where the caches live: entries are named by content)."""
    run = {k: getattr(cfg, k) for k in RUN_KEYS} | {
        "model": data.model_identity(ckpt),
        "world_size": world,
    }
    if cfg.lora_type == "lycoris":  # its settings, not where the file lies
        run["lycoris"] = json.loads(json.dumps(dataclasses.asdict(lokr_settings(cfg))))
    return comparable(run | {"datasets": json.loads(json.dumps(cfg.datasets, default=str))})


def comparable(run: dict) -> dict:
    """A run identity without where the data lies (folders, caches): a moved or re-spelled folder
    (config.json's absolute paths) is the same run; data.json compares what the folders hold."""
    where = ("instance_data_dir", "cache_dir_vae", "cache_dir_text")
    sets = run.get("datasets")
    if isinstance(sets, list):
        sets = [
            {k: v for k, v in d.items() if k not in where} if isinstance(d, dict) else d
            for d in sets
        ]
        run = run | {"datasets": sets}
    return run


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); torchrun sets WORLD_SIZE, RANK, LOCAL_RANK (NCCL on GPUs, gloo
    on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, config.pick_device(device, "device =")
    # Rank 0 builds the caches while the others wait at a barrier: NCCL's default 10 minutes would
    # end any real dataset's first run, so the wait may last as long as caching takes.
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return dist.get_rank(), world, torch.device("cuda", torch.cuda.current_device())
    return dist.get_rank(), world, torch.device("cpu")


def finish_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def lokr_settings(cfg: config.Config) -> lora.LoKrSettings:
    """The LoKr of lora_type = "lycoris": lycoris_config read as SimpleTuner reads it."""
    settings, _ = lora.parse_lycoris_config(config.read_lycoris(cfg.lycoris_config))
    return settings


def inject_adapter(transformer: M.LongCatTransformer, cfg: config.Config) -> None:
    """The config's adapter on the transformer: LoKr (lora_type = "lycoris") or LoRA."""
    if cfg.lora_type == "lycoris":
        lora.inject_lokr(transformer, lokr_settings(cfg))
    else:
        lora.inject_lora(
            transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout
        )


def check_adapter(cfg: config.Config, ckpt: Path) -> None:
    """Put the adapter on the model's shape, on the meta device (no weights, no memory), so targets
    that match nothing stop the run before any caching, naming the key."""
    with torch.device("meta"):
        transformer = M.LongCatTransformer(M.read_transformer_config(ckpt))
        try:
            inject_adapter(transformer, cfg)
        except ValueError as e:
            lokr = cfg.lora_type == "lycoris"
            key = (
                f"lycoris_config {cfg.lycoris_config}"
                if lokr
                else f"lora_targets = {cfg.lora_targets}"
            )
            raise ValueError(f"{key}: {e}") from None


def build_transformer(cfg: config.Config, ckpt: Path, device: torch.device):
    """The base (quantized while it loads) with a float32 LoRA on top; only the LoRA trains.
    Returns (transformer in train mode, the trainable parameters)."""

    def add_lora(transformer: M.LongCatTransformer) -> None:
        transformer.gradient_checkpointing = cfg.gradient_checkpointing
        transformer.checkpoint_keep_attention = cfg.checkpoint_keep_attention
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
        inject_adapter(transformer, cfg)
        lora.mark_only_lora_as_trainable(transformer)

    transformer = pipeline.build_transformer(
        ckpt,
        device,
        config.model_dtype(device, cfg.mixed_precision),
        quant_mode=cfg.base_model_precision,
        adapt=add_lora,
        offload_blocks=cfg.offload_blocks,
        compile=cfg.compile,
        knobs=config.TRAIN_KNOBS,
    )
    return transformer.train(), [p for p in transformer.parameters() if p.requires_grad]


def build_optimizer(
    cfg: config.Config, transformer, params: list, states: dict
) -> torch.optim.AdamW:
    """AdamW on the LoRA, built after any checkpoint's LoRA is in place, with its states if resuming."""
    opt = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    for name, p in transformer.named_parameters():
        if p.requires_grad and f"{name}.exp_avg" in states:
            # AdamW keeps `step` on the CPU unless capturable
            opt.state[p] = {
                k: states[f"{name}.{k}"].to("cpu" if k == "step" else p.device)
                for k in ("step", "exp_avg", "exp_avg_sq")
            }
    return opt


def average_over_ranks(params: list, loss: float, device) -> float:
    """Data parallel: the LoRA gradients and the loss averaged over the ranks in one all_reduce of
    one flat float32 buffer (not one call per tensor: a rank-16 LoRA on 12 targets is 720 tensors),
    as DDP's gradient buckets do (Li et al. 2020, "PyTorch Distributed", sec. 3.2.3). A tensor with
    no gradient on this rank counts as zeros. Returns the mean loss."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=device)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)  # (numel,) -> the tensor's shape
        offset += n
    return flat[-1].item()


def train_step(
    transformer, batch: dict, step: int, cfg: config.Config, sched: dict, params: list, device
) -> tuple[float, float]:
    """Forward and backward over the batch's micro-batches, gradients averaged over ranks and
    clipped; returns (loss, gradient norm before clipping). Nothing is applied yet."""
    B, A = cfg.train_batch_size, cfg.gradient_accumulation_steps
    total = 0.0
    for k in range(A):
        loss = (
            batch_loss(transformer, batch, slice(k * B, (k + 1) * B), step, cfg, sched, device) / A
        )
        loss.backward()
        total += loss.item()
    if dist.is_initialized():
        total = average_over_ranks(params, total, device)
    norm = torch.nn.utils.clip_grad_norm_(
        params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    )
    return total, float(norm)


def run_validation(
    transformer,
    models: pipeline.Models,
    val: list,
    cfg: config.Config,
    step: int,
    out: Path,
    ema: AdapterEMA | None = None,
):
    """validation/step-NNNNNN.png: each prompt sampled from validation_seed (the training RNG
    untouched), one captioned row per prompt: references | previews | result, for each version in
    validation_show (base, trained, ema) side by side, labelled when more than one. Returns the
    grid (a PIL image)."""
    vae = models.vae()
    rows = []
    transformer.eval()
    for v in val:
        s = pipeline.Settings(
            size=v["size"],
            seed=cfg.validation_seed,
            steps=cfg.validation_num_inference_steps,
            guidance=cfg.validation_guidance,
            negative=cfg.validation_negative_prompt,
            preview_every=cfg.validation_preview_steps,
        )
        refs = [r.to(models.device) for r in v["ref_latents"]]
        row = []
        for k, ref_image in enumerate(v["ref_images"]):
            row.append(("reference" if len(refs) == 1 else f"reference {k + 1}", ref_image))
        for version in cfg.validation_show:
            label = "" if cfg.validation_show == ["trained"] else f"{version}: "
            where = f"validation at step {step}"
            with pipeline.explain_oom(where, config.TRAIN_KNOBS, models.device):
                with showing(transformer, ema, version):
                    image, previews = pipeline.generate(
                        transformer, vae, v["txt"], v["neg"], models.sched, s, refs, progress=False
                    )
            for k, preview in previews:
                row.append((f"{label}sampler step {k}", preview))
            row.append((f"{label}result" if label else "result", image))
        caption = f"{v['prompt']}  |  training step {step}, seed {s.seed}, guidance {s.guidance}"
        rows.append((caption, row))
    transformer.train()
    models.park()
    grid = images.validation_grid(rows)
    path = out / "validation" / f"step-{step:06d}.png"
    files.write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"), "the validation grid ")
    return grid


def stop_non_finite(
    out: Path, step: int, loss: float, norm: float, run: dict
) -> FloatingPointError:
    """The error for a step whose loss or gradient is not finite. The checkpoint of the step before
    holds the weights that gave it, so it is moved aside; the one named is the newest whose weights
    gave a finite loss, and the shared LoRA file is set back to it."""
    bad = [p for p, s in checkpoints(out) if s >= step]
    files.move_aside(bad, "nonfinite")
    good = next(
        (p for p, _ in reversed(checkpoints(out)) if verify_checkpoint(p, run) is None), None
    )
    if good is not None:
        shared = out / "pytorch_lora_weights.safetensors"
        files.write_atomic(
            shared, lambda tmp: shutil.copyfile(good / shared.name, tmp), "the LoRA "
        )
    return FloatingPointError(
        f"the loss is {loss} (gradient norm {norm}) at step {step + 1}: it was not applied; the "
        "last good "
        f"checkpoint is {good or 'none'}"
        + (f" ({', '.join(p.name for p in bad)} moved aside)" if bad else "")
        + "; try a lower learning_rate or max_grad_norm, or check the data"
    )


def last_step(cfg: config.Config, samples: list, world: int) -> tuple[int, str]:
    """(the step the run ends at, the key that sets it): max_train_steps, or num_train_epochs where
    its epochs end sooner."""
    per_gpu = cfg.train_batch_size * cfg.gradient_accumulation_steps
    steps = cfg.num_train_epochs * data.batches_per_epoch(samples, per_gpu, world)
    if cfg.num_train_epochs and steps < cfg.max_train_steps:
        return steps, f"num_train_epochs = {cfg.num_train_epochs} ({steps} steps)"
    return cfg.max_train_steps, f"max_train_steps = {cfg.max_train_steps}"


def claim_output_dir(
    out: Path, run: dict, cfg: config.Config, rank: int, manifest: dict, max_steps: tuple[int, str]
) -> Path | None:
    """On rank 0 (holding the lock): remove killed runs' leftovers, refuse or move aside another run,
    choose the checkpoint to resume from and refuse to resume over changed data unless told to (the
    other ranks get the same checkpoint)."""
    resume = None
    if rank == 0:
        remove_leftovers(out)
        start_over(out, run, cfg)
        resume, warnings = choose_resume(out, cfg, run, max_steps)
        for w in warnings:
            print(f"warning: {w}")
        if resume is not None:
            check_same_data(resume, manifest, cfg)
            note_changed_settings(resume, cfg)
    if dist.is_initialized():
        dist.barrier()
        chosen = [resume]
        dist.broadcast_object_list(chosen)
        resume = chosen[0]
    return resume


# Keys a resume may change without a note: where the run ends, what it writes and shows.
QUIET_ON_RESUME = {
    "max_train_steps",
    "num_train_epochs",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_with_changed_data",
    "output_dir",  # where the data, model and output lie: compared by content and identity
    "datasets",
    "pretrained_model_name_or_path",
    "lycoris_config",
}


def note_changed_settings(resume: Path, cfg: config.Config) -> None:
    """A resume goes on with the settings given now; those that changed how it trains since the
    checkpoint (learning rate, schedule, clipping, dropout ...) are said, once each."""
    before = json.loads((resume / "state.json").read_text()).get("config", {})
    now = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))  # as state.json holds it
    changed = [
        f"{k} {before[k]!r} -> {now[k]!r}"
        for k in sorted(now)
        if k in before and before[k] != now[k] and k not in QUIET_ON_RESUME
        if not k.startswith(("validation_", "tracker_", "report_to"))
    ]
    if changed:
        print(f"note: resuming with settings changed since {resume.name}: " + ", ".join(changed))
    kind = cfg.lr_scheduler.removesuffix("_with_warmup")
    if before.get("max_train_steps", now["max_train_steps"]) != now["max_train_steps"] and (
        kind != "constant"
    ):
        print(
            f"note: max_train_steps {before['max_train_steps']} -> {now['max_train_steps']} with "
            f"lr_scheduler {cfg.lr_scheduler!r}: the steps left follow the schedule stretched to "
            f"{now['max_train_steps']} steps, so the run matches neither straight run (train "
            "afresh, resume_from_checkpoint = none, for the longer schedule)"
        )


def data_record(resume: Path) -> Path:
    """The data.json of the run a checkpoint belongs to (its output_dir/checkpoints/step-N):
    this output_dir's, or another's when resuming from a checkpoint elsewhere."""
    return resume.parent.parent / "data.json"


def check_same_data(resume: Path, manifest: dict, cfg: config.Config) -> None:
    """A resume goes on with the data the checkpoint's run trained on: pairs added, removed or
    changed since are named, and the run stops unless resume_with_changed_data = true (then the
    change is recorded in data.json)."""
    path = data_record(resume)
    if not path.exists():
        return  # a run from before data.json: nothing to compare with
    try:
        recorded = read_data_record(path)
    except ValueError as e:
        raise ValueError(
            f"{e}: move it aside to resume without comparing the data, or set "
            "resume_from_checkpoint = none to train afresh"
        ) from None
    changes = data.describe_changes(recorded["pairs"], manifest)
    if not changes:
        return
    if not cfg.resume_with_changed_data:
        raise ValueError(
            "the data changed since this run began: "
            + "; ".join(changes)
            + ". Put the data back, use another output_dir (or resume_from_checkpoint = none) to "
            "train afresh, or set resume_with_changed_data = true to go on with the new data"
        )
    print("warning: going on with changed data (recorded in data.json): " + "; ".join(changes))


def read_data_record(path: Path) -> dict:
    """data.json, checked: its pairs per dataset, as data_manifest writes them."""
    record = read_record(path, "data.json")
    pairs = record.get("pairs")
    if not (isinstance(pairs, dict) and all(isinstance(v, dict) for v in pairs.values())):
        raise ValueError(f"{path} is damaged (its pairs are not per dataset)")
    if not isinstance(record.setdefault("changes", []), list):
        raise ValueError(f"{path} is damaged (its changes are not a list)")
    return record


def record_data(
    out: Path, manifest: dict, step: int, untrained: list[str], resume: Path | None
) -> None:
    """data.json: the pairs this run trains on now, those of them it never trains (their bucket
    fills no batch) and every change it was told to go on with, from the record of the run it
    resumes (which may lie in another output_dir)."""
    path = out / "data.json"
    record = {"pairs": manifest, "never_trained": untrained, "changes": []}
    source = data_record(resume) if resume is not None else None
    if source is not None and source.exists():  # check_same_data has read it
        before = read_data_record(source)
        record["changes"] = before["changes"]
        changes = data.describe_changes(before["pairs"], manifest)
        if changes:
            record["changes"].append({"at_step": step, "changes": changes})
    text = json.dumps(record, indent=1)
    files.write_atomic(path, lambda tmp: tmp.write_text(text), "the data record ")


def begin_log(
    out: Path,
    run: dict,
    cfg: config.Config,
    cfg_dir: Path,
    step: int,
    resume: Path | None,
    note: str,
) -> LossLog:
    """run.json, config.json and the loss log (cut back to `step`), by rank 0, which says what runs."""
    print(f"resumed from {resume} at step {step}; {note}" if resume else note)
    files.write_atomic(out / "run.json", lambda tmp: tmp.write_text(json.dumps(run, indent=2)), "")
    resolved = json.dumps(dataclasses.asdict(absolute_paths(cfg, cfg_dir)), indent=2, default=str)
    files.write_atomic(out / "config.json", lambda tmp: tmp.write_text(resolved), "")
    return LossLog(out / "loss.jsonl", step)


def absolute_paths(cfg: config.Config, cfg_dir: Path) -> config.Config:
    """The config with every path made absolute (they are relative to the config's folder), so
    the config.json written into output_dir runs from there as it ran from here."""

    def here(path: str) -> str:
        return str((cfg_dir / Path(path).expanduser()).resolve()) if path else path

    model = cfg.pretrained_model_name_or_path
    if (cfg_dir / Path(model).expanduser()).exists():  # a folder, not a hub id or "tiny"
        model = here(model)
    refs = [
        [here(r) for r in v] if isinstance(v, list) else here(v) for v in cfg.validation_reference
    ]
    folders = ("instance_data_dir", "cache_dir_vae", "cache_dir_text")
    sets = [
        {k: here(v) if k in folders and isinstance(v, str) else v for k, v in d.items()}
        if isinstance(d, dict)
        else d
        for d in cfg.datasets
    ]
    return dataclasses.replace(
        cfg,
        output_dir=here(cfg.output_dir),
        pretrained_model_name_or_path=model,
        validation_reference=refs,
        datasets=sets,
        lycoris_config=here(cfg.lycoris_config) if cfg.lycoris_config else cfg.lycoris_config,
    )


def train(cfg: config.Config, cfg_dir: Path, config_file: Path | None = None) -> torch.nn.Module:
    """The whole run (from `config_file`, in `cfg_dir`); returns the transformer with its trained
    LoRA (on every rank)."""
    if not cfg.datasets:
        raise ValueError(
            f"{config_file or 'the config'} names no datasets: add [[datasets]] tables, or "
            'data_backend_config = "multidatabackend.json" (SimpleTuner\'s file)'
        )
    rank, world, device = setup_distributed(cfg.device)
    ckpt, datasets, samples, notes, val = data.read_data(cfg, cfg_dir, device)
    check_adapter(cfg, ckpt)
    B, A = cfg.train_batch_size, cfg.gradient_accumulation_steps
    short, untrained = data.check_batches(samples, B, A, world)
    notes += short
    M.set_attention_backend(cfg.attention_backend)
    out = (cfg_dir / Path(cfg.output_dir).expanduser()).resolve()
    if cfg.resume_from_checkpoint not in ("latest", "none"):  # relative to the config, as paths are
        named = cfg_dir / Path(cfg.resume_from_checkpoint).expanduser()
        cfg.resume_from_checkpoint = str(named.resolve())
    check_output_dir(out, datasets, ckpt, config_file)
    end = last_step(cfg, samples, world)
    if cfg.use_ema and cfg.ema_update_interval > end[0] and rank == 0:
        print(
            f"warning: ema_update_interval = {cfg.ema_update_interval} and {end[1]}: the EMA is "
            "never updated, and its file is the adapter as it starts"
        )
    run = run_identity(cfg, ckpt, world)
    manifest = data.data_manifest(datasets, samples)
    with OutputLock(out) if rank == 0 else nullcontext():
        resume = claim_output_dir(out, run, cfg, rank, manifest, end)
        tracker = Tracker(cfg, out) if rank == 0 else None  # a missing package stops the run here
        models = data.prepare_data(cfg, ckpt, datasets, samples, notes, val, rank, device)
        transformer, params = build_transformer(cfg, ckpt, device)
        per_gpu = cfg.train_batch_size * cfg.gradient_accumulation_steps
        loader = data.Loader(samples, per_gpu, cfg.seed, rank, world)
        step = 0
        states = {}
        if resume is not None:
            step, states = load_checkpoint(resume, transformer, loader)
        opt = build_optimizer(cfg, transformer, params, states)
        ema = load_ema(resume, transformer, cfg)
        max_steps = end[0]
        note = f"{sum(p.numel() for p in params):,} LoRA parameters on {device} x {world}"
        log = None
        if rank == 0:
            log = begin_log(out, run, cfg, cfg_dir, step, resume, note)
            record_data(out, manifest, step, untrained, resume)
        if rank == 0 and val and step == 0:
            tracker.image(0, run_validation(transformer, models, val, cfg, 0, out, ema))
        bar = tqdm(
            total=max_steps, initial=step, desc="training", disable=rank != 0, file=sys.stdout
        )
        last = resume
        for batch in loader:
            if step >= max_steps:
                break
            opt.zero_grad(set_to_none=True)
            bucket = "x".join(map(str, batch["bucket"]))
            where = f"training step {step + 1} ({bucket}, {per_gpu} per GPU)"
            knobs = f"{config.TRAIN_KNOBS}; the last checkpoint, {last or 'none yet'}, is kept"
            with pipeline.explain_oom(where, knobs, device):
                loss, norm = train_step(transformer, batch, step, cfg, models.sched, params, device)
            # checked before the update: a non-finite step is never applied
            if not (math.isfinite(loss) and math.isfinite(norm)):
                if rank == 0:
                    raise stop_non_finite(out, step, loss, norm, run)
                raise FloatingPointError(loss)
            lr = cfg.learning_rate * lr_factor(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            step += 1
            if ema is not None and step % cfg.ema_update_interval == 0:
                ema.update()
            if rank == 0:
                log.add({"step": step, "loss": loss, "lr": lr, "grad_norm": norm})
                tracker.scalars(step, {"loss": loss, "lr": lr, "grad_norm": norm})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                bar.update()
                if step % cfg.checkpointing_steps == 0 or step == max_steps:
                    last = save_checkpoint(out, step, transformer, opt, loader, cfg, run, ema)
                    images.plot_losses(log.rows(), out / "loss.png")
                if val and (step % cfg.validation_steps == 0 or step == max_steps):
                    grid = run_validation(transformer, models, val, cfg, step, out, ema)
                    tracker.image(step, grid)
        bar.close()
        if rank == 0 and resume is not None and last == resume:
            # nothing trained: a run killed after its last checkpoint may not have shared it yet
            share_checkpoint(out, resume)
            images.plot_losses(log.rows(), out / "loss.png")
        if tracker is not None:
            tracker.close()
    finish_distributed()
    if rank == 0:
        print(
            f"wrote {out / 'pytorch_lora_weights.safetensors'} (step {step}); "
            f"loss curve {out / 'loss.png'}"
        )
    return transformer


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit(
            "usage: python train.py config.toml [--key=value ...]   (keys: see config.toml and README)"
        )
    try:
        cfg = config.load_config(Path(argv[0]), argv[1:])
        train(cfg, Path(argv[0]).resolve().parent, Path(argv[0]))
    # DataError, CheckpointError and OutOfMemory are ValueErrors: a message per line, no traceback
    except (ValueError, FloatingPointError, OSError) as e:
        pipeline.close_progress_bars()
        sys.exit("\n".join(f"error: {line}" for line in str(e).splitlines()))
    except KeyboardInterrupt:  # 130, as a shell reports Ctrl-C: a script can tell it from a failure
        pipeline.close_progress_bars()
        print(
            "interrupted: run the same command again to resume from the last checkpoint",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
