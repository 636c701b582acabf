"""LoRA training for LongCat-Image-Edit (and the text-to-image LongCat-Image), in one visible loop:

    python train.py config.toml [--key=value ...]
    torchrun --nproc_per_node=N train.py config.toml          # data parallel; rank 0 writes and prints
    python train.py examples/tiny.toml                         # a tiny random model, on CPU, in a minute

The recipe is the official one (SPEC §6; meituan-longcat/LongCat-Image train_examples/edit_lora): latents and
prompt embeddings are cached first (data.py), then per step sigma = sigmoid(N(0, 1)) shifted like the
sampler's schedule, x_t = (1 - sigma) x0 + sigma eps, the reference tokens ride along clean with modality 2,
and the loss is the MSE between the predicted velocity on the target tokens and eps - x0 (rectified flow,
Liu et al. 2022; Esser et al. 2024; cloneofsimo/minRF). Only the LoRA (lora.py) trains; the base may be
int8/fp8 (quant.py). Checkpoints hold everything a resume needs (LoRA, AdamW state, step, data position,
RNG states) as safetensors + JSON, so stopping at step k and starting again ends bit-identical to a straight
run on CPU.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import time
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

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass
class Config:
    """Every key of config.toml (SimpleTuner's names where one exists); defaults are the official recipe's."""

    pretrained_model_name_or_path: str = "meituan-longcat/LongCat-Image-Edit"  # folder, hub id, or "tiny"
    model_flavour: str = ""  # edit | final | dev; "" = what the checkpoint is
    base_model_precision: str = "int8"  # no_change | int8 | fp8 (int8-quanto, fp8-torchao are aliases)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: list(lora.DEFAULT_TARGETS))
    lora_dropout: float = 0.0
    output_dir: str = "output"
    overwrite_output_dir: bool = False  # start over in an output_dir holding another run (its files are kept)
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    lr_scheduler: str = "constant"  # constant | cosine | linear (after the warmup)
    lr_warmup_steps: int = 0
    max_train_steps: int = 2000
    num_train_epochs: int = 0  # > 0: stop after this many epochs if that comes first
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    checkpointing_steps: int = 250
    checkpoints_total_limit: int = 3
    resume_from_checkpoint: str = "latest"  # latest | none | a checkpoint folder
    seed: int = 0
    mixed_precision: str = "bf16"  # bf16 | no (bf16 autocast on GPU; CPU always trains in float32)
    gradient_checkpointing: bool = True
    checkpoint_keep_attention: bool = (
        False  # keep attention outputs through checkpointing: faster, more memory
    )
    caption_dropout_probability: float = 0.1  # the empty instruction, the reference kept
    flow_schedule_auto_shift: bool = True  # shift sigma like the sampler does for this many tokens
    flow_schedule_shift: float = (
        0.0  # > 0 and auto off: a static shift s (sigma' = s sigma / (1 + (s-1) sigma))
    )
    flow_use_uniform_schedule: bool = False  # sigma ~ U(0, 1) instead of logit-normal
    validation_steps: int = 0  # 0 = no validation images
    validation_prompt: str | list = ""  # default: the first pair's instruction
    validation_reference: str | list = ""  # default: the first pair's reference
    validation_negative_prompt: str = ""
    validation_guidance: float = 4.5
    validation_num_inference_steps: int = 40
    validation_resolution: str = "768x768"
    validation_seed: int = 0
    device: str = "auto"
    aspect_bucket_alignment: int = 64
    datasets: list = field(default_factory=list)


# What makes two runs the same run: resuming across a change of any of these would mix two trainings.
RUN_KEYS = ("model_flavour", "lora_rank", "lora_alpha", "lora_targets", "train_batch_size",
            "gradient_accumulation_steps", "seed", "aspect_bucket_alignment")  # fmt: skip
CHOICES = {"lr_scheduler": ("constant", "cosine", "linear"), "mixed_precision": ("bf16", "no"),
           "model_flavour": ("", "edit", "final", "dev")}  # fmt: skip


def check_value(key: str, value, where: str):
    """The value, checked against the field's type (an int is a fine float); raises naming the key."""
    want = {f.name: f.type for f in dataclasses.fields(Config)}[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"str": isinstance(value, str), "int": number and isinstance(value, int), "float": number,
          "bool": isinstance(value, bool), "list": isinstance(value, list),
          "str | list": isinstance(value, (str, list))}[want]  # fmt: skip
    if not ok:
        raise ValueError(f"{where}: {key} should be {want.replace(' | ', ' or ')}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(
            f"{where}: {key} = {value!r}; choose one of {', '.join(c for c in CHOICES[key] if c)}"
        )
    return float(value) if want == "float" else value


def unknown_key(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(Config)], n=1)
    return ValueError(f"{where}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))


def parse_override(arg: str, where: str = "command line") -> tuple[str, object]:
    """--key=value, the value read as TOML when it parses (numbers, true/false, lists), else as a string."""
    if not arg.startswith("--") or "=" not in arg:
        raise ValueError(f"{where}: {arg!r} is not --key=value")
    key, text = arg[2:].split("=", 1)
    if key not in {f.name for f in dataclasses.fields(Config)}:
        raise unknown_key(key, where)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if isinstance(value, (int, float)) and {f.name: f.type for f in dataclasses.fields(Config)}[key] == "str":
        value = text  # e.g. --output_dir=2024
    return key, value


def load_config(path: Path, overrides: list[str]) -> Config:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    values = {}
    for where, items in ((str(path), raw.items()), ("command line", [parse_override(a) for a in overrides])):
        for key, value in items:
            if key not in {f.name for f in dataclasses.fields(Config)}:
                raise unknown_key(key, where)
            values[key] = check_value(key, value, where)
    cfg = Config(**values)
    try:
        quant.normalize_mode(cfg.base_model_precision)
    except ValueError as e:
        raise ValueError(f"base_model_precision: {e}") from None
    cfg.validation_prompt, cfg.validation_reference = (
        as_list(cfg.validation_prompt),
        as_list(cfg.validation_reference),
    )
    if cfg.validation_reference and len(cfg.validation_reference) != len(cfg.validation_prompt):
        raise ValueError(f"{path}: validation_prompt and validation_reference need the same length")
    for key in ("lora_rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{path}: {key} must be at least 1, got {getattr(cfg, key)}")
    return cfg


def as_list(v) -> list[str]:
    return [v] if isinstance(v, str) and v else ([] if isinstance(v, str) else list(v))


# ----------------------------------------------------------------------------------------------------------
# The recipe


def sample_sigmas(n: int, tokens: int, cfg: Config, sched: dict, g: torch.Generator) -> torch.Tensor:
    """Training noise levels [n]: logit-normal (or uniform), then shifted as the sampler's schedule is."""
    sigma = (
        torch.rand(n, generator=g)
        if cfg.flow_use_uniform_schedule
        else torch.sigmoid(torch.randn(n, generator=g))
    )
    if cfg.flow_schedule_auto_shift:
        return M.time_shift(M.shift_mu(tokens, sched), sigma)
    s = cfg.flow_schedule_shift
    return s * sigma / (1 + (s - 1) * sigma) if s > 0 else sigma


def training_loss(
    transformer, batch: dict, cfg: Config, sched: dict, g: torch.Generator, device
) -> torch.Tensor:
    """The rectified-flow loss of one batch: MSE(v(x_t, sigma), eps - x0) on the target tokens, in float32."""
    x0 = batch["target"]  # (B, 16, h, w)
    B, _, h, w = x0.shape
    drop = torch.rand(B, generator=g) < cfg.caption_dropout_probability  # caption dropout, reference kept
    txt = torch.where(drop[:, None, None], batch["text_empty"], batch["text"])  # (B, L, D)
    sigma = sample_sigmas(B, (h // 2) * (w // 2), cfg, sched, g)
    noise = torch.randn(x0.shape, generator=g)  # drawn on the CPU: the same numbers on any device
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    tokens, ids = M.pack(x_t), M.image_ids(h // 2, w // 2, txt.shape[1], 1)  # (B, N, 64), (N, 3)
    if batch["reference"] is not None:  # clean reference tokens after the target's, modality 2
        tokens = torch.cat([tokens, M.pack(batch["reference"])], dim=1)
        ids = torch.cat([ids, M.image_ids(h // 2, w // 2, txt.shape[1], 2)])
    dtype = next(transformer.parameters()).dtype
    with torch.autocast(
        "cuda", torch.bfloat16, enabled=device.type == "cuda" and cfg.mixed_precision == "bf16"
    ):
        pred = transformer(tokens.to(device, dtype), txt.to(device, dtype), sigma.to(device, dtype),
                           ids.to(device), M.text_ids(txt.shape[1], device))  # fmt: skip
    target = M.pack(noise - x0).to(device)
    return F.mse_loss(pred[:, : target.shape[1]].float(), target.float())


def lr_factor(step: int, cfg: Config) -> float:
    """Warmup, then constant / cosine / linear decay to 0 at max_train_steps."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    t = (step - cfg.lr_warmup_steps) / max(1, cfg.max_train_steps - cfg.lr_warmup_steps)
    return {"constant": 1.0, "linear": 1 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t))}[cfg.lr_scheduler]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, written to a temp folder and renamed


def save_checkpoint(out: Path, step: int, transformer, opt, loader, g, cfg: Config) -> Path:
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from a killed run
    tmp.mkdir(parents=True)
    lora.save_lora(tmp / "pytorch_lora_weights.safetensors", transformer, metadata={"step": step})
    names = {p: n for n, p in transformer.named_parameters() if p.requires_grad}
    states = {
        f"{names[p]}.{k}": v for p, st in opt.state.items() for k, v in st.items() if torch.is_tensor(v)
    }
    rng = {"train": g.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file({k: v.contiguous() for k, v in states.items()}, str(tmp / "optimizer.safetensors"))
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {"step": step, "loader": loader.state_dict(), "config": dataclasses.asdict(cfg)}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    tmp.rename(final)
    done = sorted(p for p in final.parent.glob("step-*") if not p.name.endswith(".tmp"))
    for old in (
        done[: max(0, len(done) - cfg.checkpoints_total_limit)] if cfg.checkpoints_total_limit > 0 else []
    ):
        shutil.rmtree(old)  # our own checkpoints of this run, beyond the limit
    write_atomic(out / "pytorch_lora_weights.safetensors", final / "pytorch_lora_weights.safetensors")
    return final


def write_atomic(dst: Path, src: Path) -> None:
    shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
    os.replace(dst.with_name(dst.name + ".tmp"), dst)


def load_checkpoint(ckpt: Path, transformer, opt, loader, g) -> int:
    lora.load_lora(transformer, ckpt / "pytorch_lora_weights.safetensors")
    states = load_file(str(ckpt / "optimizer.safetensors"))
    for name, p in transformer.named_parameters():
        if p.requires_grad and f"{name}.exp_avg" in states:
            opt.state[p] = {k: states[f"{name}.{k}"].to(p.device) for k in ("step", "exp_avg", "exp_avg_sq")}
    rng = load_file(str(ckpt / "rng.safetensors"))
    g.set_state(rng["train"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((ckpt / "state.json").read_text())
    loader.load_state_dict(state["loader"])
    return state["step"]


def find_resume(out: Path, cfg: Config) -> Path | None:
    if cfg.resume_from_checkpoint == "none":
        return None
    if cfg.resume_from_checkpoint != "latest":
        p = Path(cfg.resume_from_checkpoint)
        if not (p / "state.json").exists():
            raise ValueError(f"resume_from_checkpoint: {p} is not a checkpoint folder (no state.json)")
        return p
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def check_same_run(out: Path, run: dict, cfg: Config) -> None:
    """Refuse to mix two trainings in one output_dir; a longer run or new validation settings are fine."""
    path = out / "run.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    diff = [k for k in sorted(set(old) | set(run)) if old.get(k) != run.get(k)]
    if not diff:
        return
    if not cfg.overwrite_output_dir:
        raise ValueError(
            f"output_dir {out} holds another run ({diff[0]}: {old.get(diff[0])!r} there, "
            f"{run.get(diff[0])!r} now): choose another output_dir, or set "
            "overwrite_output_dir = true to start over (old checkpoints are moved aside)"
        )
    if (out / "checkpoints").exists():
        (out / "checkpoints").rename(out / f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}")


# ----------------------------------------------------------------------------------------------------------
# Pictures: validation grids and the loss curve, with Pillow


@torch.no_grad()
def validate(transformer, vae, val: list[dict], cfg: Config, sched: dict, device, path: Path) -> None:
    """Render the validation prompts (noise from validation_seed: the training RNG is never touched) and save
    one row per prompt: reference | result."""
    from PIL import Image

    transformer.eval()
    vae.to(device)
    dtype = next(transformer.parameters()).dtype
    rows = []
    for v in val:
        w, h = v["size"]
        noise = M.initial_noise(cfg.validation_seed, h, w, dtype).to(device)
        sigmas = M.schedule(cfg.validation_num_inference_steps, (h // 16) * (w // 16), sched)
        neg = v["neg"].to(device, dtype) if v["neg"] is not None else None
        ref = v["ref_latent"].to(device, dtype) if v["ref_latent"] is not None else None
        with torch.autocast(
            "cuda", torch.bfloat16, enabled=device.type == "cuda" and cfg.mixed_precision == "bf16"
        ):
            z = M.sample(transformer, noise, v["txt"].to(device, dtype), neg, sigmas, cfg.validation_guidance,
                         ref=ref, cfg_renorm=ref is None, progress=False)  # fmt: skip
        image = M.tensor_to_pil(M.from_latent(vae, z.to(next(vae.parameters()).dtype)))
        rows.append([v["ref_image"], image] if v["ref_image"] is not None else [image])
    vae.to("cpu")
    transformer.train()
    cols, (w, h) = max(len(r) for r in rows), max((r[-1].size for r in rows), key=lambda s: s[0] * s[1])
    grid = Image.new("RGB", (cols * w, len(rows) * h), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.resize((w, h)), (j * w, i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def plot_losses(log: Path, png: Path) -> None:
    """The loss curve (raw and a running mean) from the JSONL log, drawn with Pillow."""
    from PIL import Image, ImageDraw

    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines() if line.strip()]
    if len(losses) < 2:
        return
    W, H, pad = 800, 400, 40
    smooth, acc = [], losses[0]
    for x in losses:
        acc = 0.9 * acc + 0.1 * x
        smooth.append(acc)
    lo, hi = min(losses), max(losses)
    xy = lambda i, v: (
        pad + i * (W - 2 * pad) / (len(losses) - 1),
        H - pad - (v - lo) / (hi - lo + 1e-12) * (H - 2 * pad),
    )
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, W - pad, H - pad], outline="gray")
    d.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
    d.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    d.text(
        (pad, 10),
        f"loss: {losses[0]:.4f} -> {smooth[-1]:.4f} (running mean), {len(losses)} steps",
        fill="black",
    )
    d.text((pad, H - pad + 8), f"min {lo:.4f}  max {hi:.4f}", fill="black")
    img.save(png)


# ----------------------------------------------------------------------------------------------------------
# The run


def setup_distributed() -> tuple[int, int, torch.device | None]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL across GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, None
    local = int(os.environ.get("LOCAL_RANK", 0))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device("cuda", local)
    return dist.get_rank(), world, torch.device("cpu")


def resolve_model(cfg: Config, base: Path) -> Path:
    """A checkpoint folder: the config's (relative to the config file first), or a tiny random one."""
    name = cfg.pretrained_model_name_or_path
    if name in ("tiny", "tiny-edit", "tiny-t2i"):
        flavour = "t2i" if name == "tiny-t2i" else "edit"
        # versioned: bump when write_tiny_checkpoint changes, so an old cached copy is never reused
        cache = (
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minicat" / f"tiny-{flavour}-v1"
        )
        if not cache.exists():  # written aside and renamed: ranks racing here never see half a folder
            tmp = M.write_tiny_checkpoint(cache.with_name(f"{cache.name}.tmp-{os.getpid()}"), flavour)
            try:
                tmp.rename(cache)
            except OSError:  # another process got there first
                shutil.rmtree(tmp)
        return cache
    local = base / Path(name).expanduser()
    return M.resolve_checkpoint(local if local.exists() else name)


def prepare_data(
    cfg: Config, cfg_dir: Path, ckpt: Path, flavour: str, rank: int, device
) -> tuple[list, list]:
    """Check the datasets, build the caches (rank 0) and encode the validation prompts; the text encoder and
    VAE are loaded only on a cache miss or for validation, and freed before training."""
    datasets = data.parse_datasets(cfg.datasets, cfg_dir, cfg.aspect_bucket_alignment)
    wrong = [d.id for d in datasets if d.role != "reference" and (d.role == "edit") != (flavour == "edit")]
    if wrong:
        raise ValueError(f"dataset(s) {', '.join(wrong)} do not fit the {flavour} checkpoint (edit sets need "
                         "conditioning_data and LongCat-Image-Edit; t2i sets LongCat-Image)")  # fmt: skip
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = {}
    vae = lambda: loaded.setdefault("vae", M.load_vae(ckpt, dtype, device))
    te = lambda: loaded.setdefault("te", M.load_text_encoder(ckpt, dtype, device))
    samples = data.scan(datasets)
    ident, dname = data.model_identity(ckpt), str(dtype).removeprefix("torch.")
    if rank == 0:
        enc_latent = lambda x: M.to_latent(vae(), x.to(device, dtype)).cpu()
        enc_text = lambda prompt, ref: te().encode(prompt, ref).cpu()
        print(data.build_caches(datasets, enc_latent, enc_text, ident, dname, samples=samples).summary())
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:  # the entries rank 0 wrote (a check only)
        data.build_caches(datasets, None, None, ident, dname, progress=False, samples=samples)
    val = []
    if rank == 0 and cfg.validation_steps > 0:
        val = validation_inputs(cfg, cfg_dir, samples, flavour, te, vae, device, dtype)
    loaded.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return samples, val


def validation_inputs(cfg, cfg_dir, samples, flavour, te, vae, device, dtype) -> list[dict]:
    from PIL import Image

    w, h = (int(v) for v in cfg.validation_resolution.lower().split("x"))
    if w % 16 or h % 16:
        raise ValueError(f"validation_resolution {cfg.validation_resolution}: sides must be multiples of 16")
    prompts, refs = cfg.validation_prompt, cfg.validation_reference
    if not prompts:  # the first pair of the (edit) dataset
        prompts, refs = [samples[0].captions[0]], [str(samples[0].reference)] if samples[0].reference else []
    if flavour == "edit" and not refs:
        raise ValueError("validation_prompt is set but validation_reference is not: an edit needs an image")
    val = []
    for i, prompt in enumerate(prompts):
        ref = None
        if refs:
            path = cfg_dir / refs[i] if not Path(refs[i]).is_absolute() else Path(refs[i])
            ref = data.load_rgb(path).resize((w, h), Image.LANCZOS)
        neg = te().encode(cfg.validation_negative_prompt, ref).cpu() if cfg.validation_guidance > 1 else None
        latent = M.to_latent(vae(), M.pil_to_tensor(ref).to(device, dtype)).cpu() if ref is not None else None
        val.append({"txt": te().encode(prompt, ref).cpu(), "neg": neg, "ref_latent": latent, "ref_image": ref,
                    "size": (w, h)})  # fmt: skip
    return val


def train(cfg: Config, cfg_dir: Path) -> torch.nn.Module:
    """The whole run; returns the transformer with its trained LoRA (on every rank)."""
    rank, world, device = setup_distributed()
    device = device or torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    main = rank == 0
    out = (cfg_dir / Path(cfg.output_dir).expanduser()).resolve()
    ckpt = resolve_model(cfg, cfg_dir)
    flavour = M.read_flavour(ckpt)
    if cfg.model_flavour and (cfg.model_flavour == "edit") != (flavour == "edit"):
        raise ValueError(f"model_flavour = {cfg.model_flavour!r}, but {ckpt} is a {flavour} checkpoint")
    cfg.model_flavour = cfg.model_flavour or ("edit" if flavour == "edit" else "final")
    run = {k: getattr(cfg, k) for k in RUN_KEYS} | {"model": data.model_identity(ckpt), "world_size": world,
           "datasets": json.loads(json.dumps(cfg.datasets, default=str))}  # fmt: skip
    check_same_run(out, run, cfg)
    samples, val = prepare_data(cfg, cfg_dir, ckpt, flavour, rank, device)
    loader = data.Loader(
        samples, cfg.train_batch_size * cfg.gradient_accumulation_steps, cfg.seed, rank, world
    )

    # The model: base quantized while it loads, LoRA (float32) on top, only the LoRA trains.
    mode = quant.normalize_mode(cfg.base_model_precision)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.mixed_precision == "bf16" else torch.float32
    convert = (lambda m: quant.quantize_model(m, mode)) if mode != "none" else None
    transformer = M.load_transformer(ckpt, dtype, device, convert=convert)
    keep = "keep_attention" if cfg.checkpoint_keep_attention else True
    transformer.gradient_checkpointing = keep if cfg.gradient_checkpointing else False
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
    lora.inject_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    lora.mark_only_lora_as_trainable(transformer)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)  # fmt: skip
    g = torch.Generator().manual_seed(cfg.seed + rank)  # sigma, noise, caption dropout: per rank, resumable
    step, resume = 0, find_resume(out, cfg)
    if resume is not None:
        step = load_checkpoint(resume, transformer, opt, loader, g)
        if main:
            print(f"resumed from {resume} at step {step}")
    sched = M.read_scheduler(ckpt)
    max_steps = cfg.max_train_steps
    if cfg.num_train_epochs > 0:
        max_steps = min(max_steps, cfg.num_train_epochs * len(loader))
    vae = M.load_vae(ckpt, torch.float32 if device.type == "cpu" else torch.bfloat16, "cpu") if val else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(run, indent=2))
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        print(f"{sum(p.numel() for p in params):,} LoRA parameters; {len(samples)} samples, {len(loader)} "
              f"steps per epoch; training steps {step} -> {max_steps} on {device} x {world}")  # fmt: skip
        if val and step == 0:
            validate(transformer, vae, val, cfg, sched, device, out / "validation" / "step-000000.png")

    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=step, desc="training", disable=not main, dynamic_ncols=True)
    batches = iter(loader)
    while step < max_steps:
        batch = next(batches)  # one optimizer step's worth: batch_size x accumulation samples on this rank
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(cfg.gradient_accumulation_steps):
            rows = slice(k * cfg.train_batch_size, (k + 1) * cfg.train_batch_size)
            part = {key: v[rows] if torch.is_tensor(v) else v
                    for key, v in batch.items()}  # fmt: skip
            loss = training_loss(transformer, part, cfg, sched, g, device) / cfg.gradient_accumulation_steps
            loss.backward()
            total += loss.item()
        if dist.is_initialized():  # data parallel: average the LoRA gradients (and the loss, for the log)
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world
            t = torch.tensor([total], device=device)
            dist.all_reduce(t)
            total = t.item() / world
        if not math.isfinite(total):
            last = find_resume(out, Config(resume_from_checkpoint="latest"))
            raise FloatingPointError(
                f"the loss is {total} at step {step + 1}: stopping; the last good "
                f"checkpoint is {last or 'none'} (try a lower learning_rate)"
            )
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        )
        lr = cfg.learning_rate * lr_factor(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        step += 1
        if main:
            with open(out / "loss.jsonl", "a") as f:
                f.write(
                    json.dumps({"step": step, "loss": total, "lr": lr, "grad_norm": float(grad_norm or 0)})
                    + "\n"
                )
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
            bar.update()
            if step % cfg.checkpointing_steps == 0 or step == max_steps:
                save_checkpoint(out, step, transformer, opt, loader, g, cfg)
                plot_losses(out / "loss.jsonl", out / "loss.png")
            if val and (step % cfg.validation_steps == 0 or step == max_steps):
                validate(
                    transformer, vae, val, cfg, sched, device, out / "validation" / f"step-{step:06d}.png"
                )
    bar.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if main:
        print(
            f"wrote {out / 'pytorch_lora_weights.safetensors'} (step {step}); loss curve {out / 'loss.png'}"
        )
    return transformer


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python train.py config.toml [--key=value ...]   (keys: see config.toml and README)")
    try:
        cfg = load_config(Path(argv[0]), argv[1:])
        train(cfg, Path(argv[0]).resolve().parent)
    except (ValueError, FloatingPointError, FileNotFoundError) as e:  # data.DataError and CheckpointError too
        sys.exit("\n".join(f"error: {line}" for line in str(e).splitlines()))


if __name__ == "__main__":
    main()
