"""What a user names, checked before any work: the keys of config.toml (train.py) and what they
share with validate.py's flags (the checkpoint, the device, the dtype, the attention kernels).

- `Config`: every key of config.toml with its default (the official recipe's; SimpleTuner's names
  where one exists), its type and its range. `load_config` reads the TOML, applies `--key=value`
  overrides (values read as TOML, so `--lora_targets=["attn.to_q"]` works) and names the key of any
  problem, with the closest valid one for a typo (nanoGPT's configurator.py, with types).
- `resolve_checkpoint`: `pretrained_model_name_or_path` / `--model` -> a checkpoint folder in the
  released layout (a folder, a hub id through huggingface_hub, or `tiny` / `tiny-t2i`, tiny.py's
  random demo). What the folder must hold is model.py's business.
- `pick_device`, `model_dtype`, `check_attention`: `device` / `--device`, the dtype rule, and
  `attention_backend` / `--attention`, each refused in one line naming the key.
The generation settings' limits (validation_*) are pipeline.py's LIMITS; the datasets' own keys
(`[[datasets]]`) are checked by data.py, which knows what they mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel

import lora
import model as M
import pipeline
import quant
import simpletuner
import tiny

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEFAULT_MODEL = "meituan-longcat/LongCat-Image-Edit"
# What lowers memory, for the out-of-memory message.
TRAIN_KNOBS = (
    'base_model_precision = "int8", text_encoder_precision = "int8", a smaller dataset '
    "resolution, a lower lora_rank, checkpoint_keep_attention = false, train_batch_size = 1 or "
    "offload_blocks = N"
)
# The released checkpoint of each model_flavour (SimpleTuner's names).
FLAVOUR_MODELS = {
    "edit": "meituan-longcat/LongCat-Image-Edit",
    "final": "meituan-longcat/LongCat-Image",
    "dev": "meituan-longcat/LongCat-Image-Dev",
}


# --------------------------------------------------------------------------------------------------
# The checkpoint a user names


def resolve_checkpoint(name: str | Path, base: Path | None = None) -> Path:
    """A checkpoint folder: `tiny` / `tiny-t2i` (the random demo, tiny.py), a folder (relative to
    `base` first, e.g. the config's folder), or a hub id downloaded or found in the Hugging Face
    cache (HF_HOME, HF_HUB_OFFLINE=1 are honoured by huggingface_hub)."""
    if str(name) in ("tiny", "tiny-edit", "tiny-t2i"):
        return tiny.checkpoint("t2i" if str(name) == "tiny-t2i" else "edit")
    path = Path(name).expanduser()
    if base is not None and (base / path).exists():
        path = base / path
    if not path.exists():
        if str(name).count("/") != 1 or str(name).startswith((".", "/", "~")):
            raise M.CheckpointError(
                f"{name}: no such folder (and not a hub id like {DEFAULT_MODEL})"
            )
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(name)))
        # network, auth, offline without a cached copy: all end the same way for a user
        except Exception as e:
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise M.CheckpointError(
                f"{name}: not downloadable nor in the Hugging Face cache "
                f"({type(e).__name__}: {first}); pass a local folder, or set HF_HOME to where it "
                "was downloaded"
            ) from None
    return M.check_checkpoint(path)


# --------------------------------------------------------------------------------------------------
# Devices, dtypes, attention kernels

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def pick_device(name: str | None, key: str = "--device") -> torch.device:
    """The device to run on: the one named (checked to exist), else cuda, then mps, then cpu."""
    if not name or name == "auto":
        if torch.cuda.is_available():  # with its index: tensors report "cuda:0", devices compare
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key} {name!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        if torch.version.cuda:
            seen = f"{torch.cuda.device_count()} CUDA device(s)"
        else:
            seen = "a CPU-only torch"
        raise ValueError(
            f"{key} {name!r}: not available here ({seen}); use cpu or install a CUDA torch"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key} {name!r}: MPS is not available here; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{key} {name!r}: unsupported; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        return torch.device("cuda", device.index or 0)
    return device


def model_dtype(device: torch.device, mixed_precision: str = "bf16") -> torch.dtype:
    """The dtype of the frozen models and the activations, for inference and training alike:
    bfloat16 on a GPU (with training's mixed_precision = "bf16": no autocast, fewer casts; the
    LoRA and AdamW stay float32), float32 on the CPU (it emulates bf16) or with "no"."""
    if device.type == "cpu" or mixed_precision == "no":
        return torch.float32
    return torch.bfloat16


# Said wherever cuDNN attention is chosen by name: the probe below runs it at a tiny size only.
CUDNN_NOTE = (
    "it passed a tiny probe here, but its backward crashed (illegal memory access) and gave NaN "
    "at full size on an H200 with torch 2.11; 'auto' avoids it where gradients flow"
)


def check_attention(
    name: str, device, dtype: torch.dtype, head_dim: int, grad: bool, key: str
) -> None:
    """Try the chosen attention kernels on a tiny input: a kernel this device lacks is named now,
    with the choices. Only checks; the caller then sets it (model.set_attention_backend). A kernel
    that runs at this tiny size may still fail at full size (cuDNN's backward did on an H200)."""
    try:
        backends = M.attention_backends(name)[grad]
    except ValueError as e:
        raise ValueError(f"{key} {e}") from None
    q = torch.randn(1, 8, 2, head_dim, device=device, dtype=dtype, requires_grad=grad)
    kernels = sdpa_kernel(backends) if backends else nullcontext()
    try:
        with torch.set_grad_enabled(grad), kernels:
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            if grad:
                out.sum().backward()
    except RuntimeError as e:
        where = f"{device.type} with {str(dtype).removeprefix('torch.')}"
        raise ValueError(
            f"{key} {name!r}: not available on {where} ({str(e).splitlines()[0][:100]}); "
            f"choose one of {', '.join(M.ATTENTION_CHOICES)}"
        ) from None


# --------------------------------------------------------------------------------------------------
# config.toml


@dataclass
class Config:
    """config.toml's keys (SimpleTuner's names where one exists); defaults are the official recipe's."""

    # folder, hub id, or "tiny" / "tiny-t2i"; unset: model_flavour's checkpoint (FLAVOUR_MODELS)
    pretrained_model_name_or_path: str = DEFAULT_MODEL
    model_flavour: str = ""  # edit | final | dev; "" = what the checkpoint is
    # no_change | int8 | fp8 | fp8-compute (int8-quanto, fp8-torchao are aliases)
    base_model_precision: str = "int8"
    text_encoder_precision: str = (
        "no_change"  # the text encoder while caching: no_change | int8 | fp8
    )
    lora_type: str = "standard"  # standard (LoRA) | lycoris (LoKr, from lycoris_config)
    lycoris_config: str = ""  # a LyCORIS JSON file, as SimpleTuner's; read when lora_type = lycoris
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_target_preset: str = "official"  # official (12 targets) | attention (SimpleTuner's)
    lora_targets: list = field(default_factory=list)  # module-name suffixes; [] = the preset's
    lora_dropout: float = 0.0
    output_dir: str = "output"
    overwrite_output_dir: bool = (
        False  # start over in a folder holding another run (its files moved aside)
    )
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    # constant | cosine | linear | polynomial (after the warmup); constant_with_warmup and
    # cosine_with_warmup are SimpleTuner's names for constant and cosine
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_end: float = 4e-7  # polynomial: the rate at max_train_steps (SimpleTuner's default)
    lr_power: float = 0.8  # polynomial: the decay's power (SimpleTuner's default)
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
    # go on although pairs were added, removed or changed since the run began (recorded in data.json)
    resume_with_changed_data: bool = False
    seed: int = 0
    # bf16: on a GPU the base and activations in bfloat16 (LoRA and AdamW stay float32) | no:
    # float32
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    checkpoint_keep_attention: bool = (
        False  # keep attention outputs: faster at large sizes, more memory
    )
    attention_backend: str = "auto"  # auto | flash | efficient | cudnn | math
    compile: bool = False  # torch.compile each block (two compiles: joint and single blocks)
    offload_blocks: int = 0  # stream the first N blocks' frozen weights from CPU memory
    caption_dropout_probability: float = 0.1  # the empty instruction this often, the reference kept
    # the resolution-dependent shift of the sampler; off when the user sets flow_schedule_shift > 0
    # without setting this key (load_config)
    flow_schedule_auto_shift: bool = True
    flow_schedule_shift: float = 0.0  # with auto shift off and > 0: a static shift s
    flow_use_uniform_schedule: bool = False
    validation_steps: int = 0  # 0 = no validation images
    validation_prompt: str | list = ""  # default: the first pair's instruction and reference
    validation_reference: str | list = ""
    validation_negative_prompt: str = ""
    validation_guidance: float = 4.5
    validation_num_inference_steps: int = 40
    validation_resolution: str = "768x768"
    validation_seed: int = 0
    validation_preview_steps: int = 0  # > 0: also show the decoded image every N sampler steps
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    aspect_bucket_alignment: int = 64
    datasets: list = field(default_factory=list)
    # --- issue 21: EMA of the adapter (SimpleTuner's names and defaults), validation, trackers
    use_ema: bool = False  # keep an exponential moving average of the adapter
    ema_decay: float = 0.995  # the most the EMA keeps per update (diffusers' EMAModel schedule)
    ema_update_interval: int = 1  # update the EMA every N optimizer steps
    validation_show: list = field(default_factory=lambda: ["trained"])  # base | trained | ema
    report_to: str = "none"  # none | tensorboard | wandb: loss, lr, grad norm, validation grids
    tracker_project_name: str = "minicat"
    tracker_run_name: str = ""  # default: output_dir's folder name

    def check(self) -> None:
        """Every value within its range; a ValueError names the key and what it accepts."""
        for key, low in AT_LEAST.items():
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
                named = ", ".join(c for c in choices if c)
                raise ValueError(f"{key} = {getattr(self, key)!r}: choose one of {named}")
        for key, compute in (("base_model_precision", True), ("text_encoder_precision", False)):
            try:
                quant.normalize_mode(getattr(self, key), compute=compute)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        pipeline.parse_size(self.validation_resolution, "validation_resolution")
        for name in ("seed", "steps", "guidance"):
            key = f"validation_{name}" if name != "steps" else "validation_num_inference_steps"
            pipeline.check_setting(name, getattr(self, key), key)
        if not self.lora_targets:
            self.lora_targets = list(LORA_PRESETS[self.lora_target_preset])
        if self.lr_scheduler == "polynomial" and not self.lr_end < self.learning_rate:
            raise ValueError(
                f"lr_end = {self.lr_end}: must be below learning_rate = {self.learning_rate}"
            )
        if self.lora_type == "lycoris" and not self.lycoris_config:
            raise ValueError('lora_type = "lycoris" needs lycoris_config (a JSON file path)')
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(
                f"lora_targets = {self.lora_targets!r}: a list of module-name suffixes"
            )
        if self.offload_blocks and not self.gradient_checkpointing:
            raise ValueError(
                "offload_blocks needs gradient_checkpointing = true (else every block stays on the GPU)"
            )
        self.validation_prompt, self.validation_reference = (
            as_list(self.validation_prompt),
            as_list(self.validation_reference),
        )
        if self.validation_reference and len(self.validation_reference) != len(
            self.validation_prompt
        ):
            raise ValueError(
                "validation_prompt and validation_reference need the same number of entries"
            )
        # issue 21: EMA, what validation shows; a prompt's reference: file(s) or "" (none)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay = {self.ema_decay}: must be in [0, 1)")
        if not 1 <= self.ema_update_interval < 2**62:
            raise ValueError(
                f"ema_update_interval = {self.ema_update_interval}: must be at least 1"
            )
        show = self.validation_show
        if not show or len(set(show)) < len(show) or set(show) - {"base", "trained", "ema"}:
            raise ValueError(f"validation_show = {show!r}: a list of distinct base, trained, ema")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise ValueError(
                f"report_to = {self.report_to!r}: choose one of none, tensorboard, wandb"
            )
        if "ema" in show and not self.use_ema:
            raise ValueError('validation_show includes "ema": set use_ema = true')
        for ref in self.validation_reference:
            files = isinstance(ref, list) and ref and all(isinstance(r, str) and r for r in ref)
            if not (isinstance(ref, str) or files):
                raise ValueError(
                    f'validation_reference: {ref!r} should be a file, a list of files or ""'
                )


# Integer keys and their least value.
AT_LEAST = {
    "lora_rank": 1,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_train_steps": 1,
    "checkpointing_steps": 1,
    "checkpoints_total_limit": 0,
    "num_train_epochs": 0,
    "lr_warmup_steps": 0,
    "validation_steps": 0,
    "seed": 0,
    "validation_preview_steps": 0,
    "offload_blocks": 0,
}
# Float keys: (low, high, which ends are allowed: "[" / "]" included, "(" / ")" not).
RANGES = {
    "learning_rate": (0, 1, "(]"),
    "lora_alpha": (0, 1e6, "(]"),
    "adam_epsilon": (0, 1, "(]"),
    "lora_dropout": (0, 1, "[)"),
    "adam_beta1": (0, 1, "[)"),
    "adam_beta2": (0, 1, "[)"),
    "caption_dropout_probability": (0, 1, "[]"),
    "adam_weight_decay": (0, 10, "[]"),
    "max_grad_norm": (0, 1e6, "[]"),
    "flow_schedule_shift": (0, 100, "[]"),
    "lr_end": (0, 1, "[]"),
    "lr_power": (0, 100, "(]"),
}
CHOICES = {
    "lr_scheduler": (
        "constant",
        "constant_with_warmup",
        "cosine",
        "cosine_with_warmup",
        "linear",
        "polynomial",
    ),
    "lora_type": ("standard", "lycoris"),
    "lora_target_preset": ("official", "attention"),
    "mixed_precision": ("bf16", "no"),
    "model_flavour": ("", "edit", "final", "dev"),
    "attention_backend": tuple(M.ATTENTION_CHOICES),
}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# lora_target_preset: official = the official recipe's 12 targets (LongCat-Image train_examples);
# attention = SimpleTuner's LongCat default (to_k, to_q, to_v, to_out.0, to_qkv; LongCat has no
# fused to_qkv, so its q, k, v are the three).
LORA_PRESETS = {
    "official": lora.DEFAULT_TARGETS,
    "attention": ("to_k", "to_q", "to_v", "to_out.0"),
}


def as_list(v) -> list[str]:
    return [v] if isinstance(v, str) and v else ([] if isinstance(v, str) else list(v))


def check_type(key: str, value, where: str):
    """The value, checked against the field's type (an int is a fine float); raises naming the key."""
    if key not in FIELDS:
        # minicat's keys and the SimpleTuner names it knows: a typo of either finds its key
        close = difflib.get_close_matches(
            key, [*FIELDS, *simpletuner.RENAMED, *simpletuner.KEYS], n=1
        )
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
    """--key=value, the value read as TOML when it parses (numbers, true/false, lists), else as a
    string."""
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
    """config.toml or SimpleTuner's config.json (simpletuner.py reads its spellings and its
    multidatabackend file), then --key=value overrides. Every key's fate is settled before any
    work: the problems of all keys raise together; keys ignored with a warning are printed."""
    raw = simpletuner.read_file(path)
    for key, value in map(parse_override, overrides):  # an override replaces either spelling
        raw = {k: v for k, v in raw.items() if _name(k) != _name(key)} | {key: value}
    values, warnings, problems = simpletuner.translate(raw, path, set(FIELDS))
    for key, value in list(values.items()):
        if key in FIELDS and FIELDS[key].type in ("bool", "int", "float"):
            value = simpletuner.plain(value)  # "true", "20", "1e-4" as SimpleTuner reads them
        try:
            values[key] = check_type(key, value, str(path))
        except ValueError as e:
            problems.append(str(e))
            del values[key]  # the default stands in, so the checks below still run
    if "pretrained_model_name_or_path" not in values and values.get("model_flavour"):
        values["pretrained_model_name_or_path"] = FLAVOUR_MODELS.get(
            values["model_flavour"], DEFAULT_MODEL
        )
    shift = values.get("flow_schedule_shift", 0)
    if shift and "flow_schedule_auto_shift" not in values:
        values["flow_schedule_auto_shift"] = False  # the shift the user set is the one used
    elif shift and values["flow_schedule_auto_shift"]:
        warnings.append(
            f"{path}: flow_schedule_shift = {shift} is not used: flow_schedule_auto_shift = true "
            "wins (the shift follows each image's size); set it false for a static shift"
        )
    if values.get("lora_type") == "lycoris":
        problems += _check_lycoris(values, path, warnings)
    elif values.get("lycoris_config"):
        warnings.append(
            f"{path}: lycoris_config is not used: lora_type = "
            f'{values.get("lora_type", "standard")!r} trains a LoRA; set lora_type = "lycoris" '
            "for LoKr"
        )
    cfg = Config(**values)
    try:  # the ranges and choices too, so one run reports everything
        cfg.check()
    except ValueError as e:
        problems.append(f"{path}: {e}")
    for line in warnings:  # the whole report, also when problems stop the run
        print(f"warning: {line}", file=sys.stderr)
    if problems:
        raise ValueError("\n".join(problems))
    return cfg


def _name(key: str) -> str:
    """minicat's name for a key in either spelling, with or without SimpleTuner's -- prefix."""
    key = key.lstrip("-")
    return simpletuner.RENAMED.get(key, key)


def _check_lycoris(values: dict, path: Path, warnings: list[str]) -> list[str]:
    """lycoris_config read now (its path made absolute), so its problems join the others."""
    name = values.get("lycoris_config")
    if not name:
        return []
    for candidate in (path.parent / name, Path(name), path.parent / Path(name).name):
        if candidate.expanduser().is_file():
            values["lycoris_config"] = str(candidate.expanduser().resolve())
            break
    else:
        return [f"{path}: lycoris_config = {name!r}: no such file beside the config or here"]
    try:
        _, notes = lora.parse_lycoris_config(read_lycoris(values["lycoris_config"]))
    except ValueError as e:
        return [f"{name}: {e}"]
    warnings += [f"{name}: {note}" for note in notes]
    for key in ("lora_rank", "lora_alpha", "lora_targets", "lora_target_preset", "lora_dropout"):
        if key in values:
            warnings.append(
                f"{path}: {key} is not used with lora_type = lycoris (lycoris_config's "
                "linear_dim, linear_alpha, factor and apply_preset are)"
            )
    return []


def read_lycoris(name: str) -> dict:
    """A lycoris_config JSON file as a dict; a one-line ValueError naming it otherwise."""
    try:
        found = json.loads(Path(name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"lycoris_config {name}: {e}") from None
    if not isinstance(found, dict):
        raise ValueError(f"lycoris_config {name}: a JSON object of LyCORIS settings")
    return found
