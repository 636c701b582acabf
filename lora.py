"""LoRA for any Linear-like layer: inject, train, merge, and save/load files every LoRA loader applies alike.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a weight W (out, in) and learns a low-rank update:

    y = base(x) + m * (alpha / r) * B(A(dropout(x)))      A: (r, in), B: (out, r)

A starts Kaiming-uniform (a = sqrt(5), peft's and loralib's default) and B at zero, so an adapted model
starts equal to its base. alpha / r is the paper's scaling (§4.1) and m a runtime multiplier
(`set_lora_scale`; m = 0 gives the base exactly). The branch runs as two skinny matmuls in the input dtype:
B·A is never formed, except by `merge()`, which adds it into the base weight on request (litgpt's explicit,
idempotent merge; loralib's implicit merge when switching to eval mode is the counter-example).

`LoRALinear` wraps whatever it is given (`self.base`): an nn.Linear, or quant.py's QuantLinear, found by duck
typing: anything with `in_features`, `out_features` and a forward. Merging into a quantized base needs its
`dequantize() -> Tensor` and `load_float_weight(w)` (dequantize, add, requantize). Wrapping renames the base
tensors (`…to_q.weight` -> `…to_q.base.weight`); the LoRA tensors keep the module's own name
(`…to_q.lora_A.weight`), which is what every file below uses.

File layout (`save_lora`), one file that every loader applies alike:
    transformer.<module>.lora_A.weight  (r, in)     transformer.<module>.lora_B.weight  (out, r)
    __metadata__ = {"format": "pt", "lora_adapter_metadata": json({"transformer.r": r,
                    "transformer.lora_alpha": ..., "transformer.target_modules": [...], ...})}
The shared file (fold=True, the default) carries B x alpha / r and says lora_alpha = r, so the update is
B @ A at scale 1.0 whoever reads it: diffusers' `load_lora_adapter(path, prefix="transformer")` reads the
metadata only with use_safetensors=True (else it takes alpha = r), Flux-style `lora_state_dict` refuses a
file with both `.alpha` tensors and metadata, and ComfyUI (its LongCat model is a Flux subclass; comfy/lora.py
maps `transformer.<diffusers name>` onto row slices of its fused qkv / linear1 weights) reads no metadata and
scales by 1.0 without an `.alpha` tensor. Training checkpoints use fold=False: B as trained and alpha in the
metadata, so a resume continues with the same dynamics, bit for bit.

`load_lora` also reads peft (`base_model.model.…lora_A.default.weight`, alpha from adapter_config.json),
diffusers (with or without `transformer.`), kohya-style `lora_down`/`lora_up` and `diffusion_model.` keys.
One adapter per module: loading overwrites the adapters of the modules a file names (in place when the rank
matches, so an optimizer built on them stays valid). To stack several files, `merge_and_unload` after each.
References: microsoft/LoRA loralib; Lightning-AI/litgpt lora.py; huggingface/peft LoraConfig; diffusers
loaders/peft.py; Comfy-Org/ComfyUI comfy/lora.py and comfy/weight_adapter/lora.py.
"""

import json
import math
import os
import re

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
# The rest of the peft LoraConfig diffusers writes into lora_adapter_metadata (plain LoRA, default init).
PEFT_REST = dict(
    bias="none", use_dora=False, use_rslora=False, init_lora_weights=True, rank_pattern={}, alpha_pattern={}
)
FILE_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")  # stripped from keys when loading
FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # looked for in a directory


class LoRALinear(nn.Module):
    """`base(x) + multiplier * alpha / rank * lora_B(lora_A(dropout(x)))` around a frozen Linear-like base."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dtype=torch.float32):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(t for t in [*base.parameters(), *base.buffers()]).device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / rank
        self.multiplier = 1.0
        self.merged = False
        self.merged_factor = 0.0  # the scale * multiplier merge() added, so unmerge() removes just that

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.multiplier == 0:
            return y
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        # the update rounded as peft rounds it (scaled, then added), so LoRA outputs match diffusers in bf16
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * (self.scale * self.multiplier)

    def _add_to_base(self, factor: float) -> None:
        a, b, base = self.lora_A.weight.detach().float(), self.lora_B.weight.detach().float(), self.base
        delta = factor * (b @ a)  # (out, in)
        if hasattr(base, "dequantize") and hasattr(base, "load_float_weight"):  # quant.QuantLinear
            w = base.dequantize().float()
            base.load_float_weight(w + delta.to(w.device))
        elif isinstance(getattr(base, "weight", None), torch.Tensor) and base.weight.is_floating_point():
            with torch.no_grad():
                base.weight.copy_((base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype))
        else:
            raise ValueError(
                f"cannot merge LoRA into a {type(base).__name__}: it has neither a float `weight` nor "
                "`dequantize()` + `load_float_weight(w)`"
            )

    def merge(self) -> None:
        """Add the update into the base weight (in float32, then cast or requantize); no-op when merged."""
        if not self.merged:
            self.merged_factor = self.scale * self.multiplier
            self._add_to_base(self.merged_factor)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract what merge() added (exact up to rounding / requantization); no-op when not merged."""
        if self.merged:
            self._add_to_base(-self.merged_factor)
            self.merged = False


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 16,
    targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Wrap every module whose dotted name ends with a target (on a '.' boundary) in a LoRALinear."""
    names = [n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no module of the model matches the LoRA targets {list(targets)}")
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if not hasattr(m, "in_features") or not hasattr(m, "out_features"):
            raise ValueError(f"LoRA target {name} is a {type(m).__name__}, not a Linear")
        _set(model, name, LoRALinear(m, rank, alpha, dropout, dtype))
    return names


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)} for every adapted module."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the runtime multiplier m of every adapter (0 = base model, 1 = as trained)."""
    for name, m in _lora_layers(model).items():
        if m.merged:
            raise ValueError(f"{name} is merged; unmerge before changing its scale")
        m.multiplier = scale


def merge(model: nn.Module) -> None:
    for m in _lora_layers(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in _lora_layers(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the bare base modules back (then another file can be loaded on top)."""
    for name, m in _lora_layers(model).items():
        m.merge()
        _set(model, name, m.base)
    return model


def save_lora(
    path: str | os.PathLike,
    model_or_state: nn.Module | dict[str, torch.Tensor],
    rank: int | None = None,
    alpha: float | None = None,
    metadata: dict | None = None,
    fold: bool = True,
) -> None:
    """Write a LoRA file (layout in the module docstring). From a model, rank and alpha are read off its
    layers; from a state dict, rank comes from the shapes and alpha defaults to rank. fold=True (the file
    people share) multiplies lora_B by alpha / rank and records alpha = rank, so every loader applies scale
    1.0 and agrees; fold=False keeps B and alpha as trained (training checkpoints, to resume exactly).
    `metadata` adds top-level safetensors metadata entries (e.g. the training config), JSON-encoded."""
    dropout = 0.0
    if isinstance(model_or_state, nn.Module):
        layers = _lora_layers(model_or_state)
        if not layers:
            raise ValueError("the model has no LoRA layers to save")
        ranks, alphas = {m.rank for m in layers.values()}, {m.alpha for m in layers.values()}
        if len(ranks) > 1 or len(alphas) > 1:
            raise ValueError(
                f"save_lora writes one rank and alpha; the model has ranks {ranks}, alphas {alphas}"
            )
        if rank not in (None, *ranks) or alpha not in (None, *alphas):
            raise ValueError(
                f"rank={rank}, alpha={alpha} disagree with the model's {ranks.pop()}, {alphas.pop()}"
            )
        rank, alpha = ranks.pop(), alphas.pop()
        dropout = getattr(next(iter(layers.values())).lora_dropout, "p", 0.0)
        state = lora_state_dict(model_or_state)
    else:
        state = model_or_state
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    shapes = {state[f"{m}.lora_A.weight"].shape[0] for m in modules}
    if rank is None:
        rank = shapes.pop() if len(shapes) == 1 else None
    if rank is None or shapes - {rank}:
        raise ValueError(f"save_lora writes one rank; the lora_A tensors have ranks {sorted(shapes)}")
    alpha = float(rank if alpha is None else alpha)
    tensors = {f"transformer.{k}": v.detach().float().contiguous().cpu() for k, v in state.items()}
    if fold:
        tensors = {k: v * (alpha / rank) if ".lora_B." in k else v for k, v in tensors.items()}
        alpha = float(rank)
    config = {"r": rank, "lora_alpha": alpha, "target_modules": modules, "lora_dropout": dropout, **PEFT_REST}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta["format"] = "pt"
    meta["lora_adapter_metadata"] = json.dumps(
        {f"transformer.{k}": v for k, v in config.items()}, sort_keys=True
    )
    safetensors.torch.save_file(tensors, os.fspath(path), metadata=meta)


def _read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, peft config dict) of a LoRA file; the config from its metadata or adapter_config.json."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in FILE_NAMES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise ValueError(f"{path} holds none of {FILE_NAMES}")
        path = found[0]
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except (OSError, safetensors.SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors LoRA ({str(e).splitlines()[0][:120]})"
        ) from None
    beside = os.path.join(os.path.dirname(path), "adapter_config.json")
    if not config and os.path.isfile(beside):
        with open(beside) as f:
            config = json.load(f)
    return tensors, {k.removeprefix("transformer."): v for k, v in config.items()}


def read_lora(path: str | os.PathLike) -> tuple[str, dict[str, dict], dict]:
    """(path, {module: {"A": (key, tensor), "B": ..., "alpha": ...}}, config) of a LoRA file (ours,
    diffusers, peft, kohya-dotted), every tensor checked to be a plain, finite LoRA tensor."""
    tensors, config = _read_file(path)
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters are not supported")
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    found: dict[str, dict] = {}
    for key, t in tensors.items():
        k = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)  # peft's lora_A.<adapter>.weight
        k = k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")
        while k.startswith(FILE_PREFIXES):
            k = k.split(".", 2)[2] if k.startswith("base_model.model.") else k.split(".", 1)[1]
        match = re.fullmatch(r"(.+)\.(?:lora_(A|B)\.weight|(alpha))", k)
        if match is None:
            raise ValueError(
                f"{path}: {key} is not a plain LoRA tensor (<module>.lora_A/lora_B.weight or .alpha)"
            )
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{path}: {key} holds NaN, inf or non-float values")
        found.setdefault(match[1], {})[match[2] or "alpha"] = (key, t)
    return os.fspath(path), found, config


def check_lora(model: nn.Module, path: str, found: dict[str, dict], config: dict) -> None:
    """Every module a LoRA file names exists in `model` as a Linear, unmerged, with matching shapes. Works
    on a meta-device model, so a file can be checked before any weight is loaded."""
    modules = dict(model.named_modules())
    for name in sorted(found):
        parts = found[name]
        key, m = next(iter(parts.values()))[0], modules.get(name)
        if m is None:
            raise ValueError(f"{path}: {key}: the model has no module {name!r} (a LoRA for another model?)")
        if not hasattr(m, "in_features") or not hasattr(m, "out_features"):
            raise ValueError(f"{path}: {key}: module {name!r} is a {type(m).__name__}, not a Linear")
        if isinstance(m, LoRALinear) and m.merged:
            raise ValueError(f"{path}: {key}: module {name!r} has a merged adapter; unmerge it first")
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"{path}: {key}: module {name!r} needs both lora_A and lora_B")
        (key_a, a), (key_b, b) = parts["A"], parts["B"]
        for k, t, expected in (
            (key_a, a, (a.shape[0], m.in_features)),
            (key_b, b, (m.out_features, a.shape[0])),
        ):
            if tuple(t.shape) != expected:
                raise ValueError(f"{path}: {k}: expected shape {expected}, got {tuple(t.shape)}")


def load_lora(model: nn.Module, path: str | os.PathLike, scale: float = 1.0) -> list[str]:
    """Load a LoRA file (ours, diffusers, peft, kohya-dotted) into `model`, injecting adapters where needed.
    Every key is checked against the model before anything changes; returns the adapted module names."""
    path, found, config = read_lora(path)
    check_lora(model, path, found, config)
    modules = dict(model.named_modules())
    for name, parts in found.items():
        (_, a), (_, b), m = parts["A"], parts["B"], modules[name]
        r = a.shape[0]
        alpha = parts["alpha"][1].item() if "alpha" in parts else _alpha_for(name, r, config)
        if isinstance(m, LoRALinear) and m.rank == r:  # reuse it: an optimizer built on it stays valid
            layer, layer.alpha = m, alpha
        else:
            base, p = (m.base, getattr(m.lora_dropout, "p", 0.0)) if isinstance(m, LoRALinear) else (m, 0.0)
            layer = LoRALinear(base, r, alpha, dropout=p)
            _set(model, name, layer)
        # rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead of alpha / r
        layer.scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        layer.multiplier = scale
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    return sorted(found)


def _alpha_for(name: str, rank: int, config: dict) -> float:
    """peft's alpha for one module: alpha_pattern (full name or '.'-suffix), else lora_alpha, else rank."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        pattern = pattern.removeprefix("^")
        if name == pattern or name.endswith("." + pattern):
            return float(alpha)
    return float(config.get("lora_alpha", rank))
