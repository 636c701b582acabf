"""LoRA and LoKr for any Linear-like layer: inject, train, merge, and save/load files that other
tools apply alike.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a weight W (out, in) and learns a low-rank update:

    y = base(x) + m * (alpha / r) * B(A(dropout(x)))      A: (r, in), B: (out, r)

A starts Kaiming-uniform (a = sqrt(5), peft's and loralib's default) and B at zero, so an adapted
model starts equal to its base. alpha / r is the paper's scaling (§4.1) and m a runtime multiplier
(`set_lora_scale`; m = 0 gives the base exactly). The branch runs as two skinny matmuls in the input
dtype: B·A is never formed, except by `merge()`, which adds it into the base weight on request
(litgpt's explicit, idempotent merge; loralib's implicit merge when switching to eval mode is the
counter-example).

LoKr (LyCORIS; Yeh et al. 2024, arXiv:2309.14859) learns the update as a Kronecker product:

    y = base(x) + m * s * (w1 ⊗ w2) x      w1: (a, c), w2: (b, d), out = a * b, in = c * d
    (a, b) = factorization(out, factor), (c, d) = factorization(in, factor), a <= b, c <= d

w2 is stored as w2_a (b, r) @ w2_b (r, d) when r = linear_dim < max(b, d) / 2 and not full_matrix,
else whole; s = linear_alpha / r when split and 1 when whole (alpha is then ignored). SimpleTuner's
LongCat-Edit example (linear_dim 10000, factor 16) thus trains, for a 3072 x 3072 projection, a
whole 192 x 192 w2 beside a 16 x 16 w1. w1 and w2_a start Kaiming-uniform, w2 and w2_b at zero, so
the update starts at 0. The branch never forms w1 ⊗ w2: with x viewed as X (c, d) it is w1 X w2^T,
flattened (LyCORIS's bypass_mode). Shapes, split, scale and initialisation are LyCORIS's
(lycoris/modules/lokr.py LokrModule, lycoris/functional/general.py factorization).

`LoRALinear` and `LoKrLinear` wrap whatever they are given (`self.base`): an nn.Linear, or
quant.py's QuantLinear, found by duck typing: anything with `in_features`, `out_features` and a
forward. Neither reads the base weight in its forward pass, so the base may be quantized or
offloaded. Merging into a quantized base needs its `dequantize() -> Tensor` and
`load_float_weight(w)` (dequantize, add, requantize). Wrapping renames the base tensors
(`…to_q.weight` -> `…to_q.base.weight`); the adapter tensors keep the module's own name
(`…to_q.lora_A.weight`, `…to_q.lokr_w1`), as the files below do.

LoRA file layout (`save_lora`), one file that every loader applies alike:
    transformer.<module>.lora_A.weight  (r, in)     transformer.<module>.lora_B.weight  (out, r)
    __metadata__ = {"format": "pt", "lora_adapter_metadata": json({"transformer.r": r,
                    "transformer.lora_alpha": ..., "transformer.target_modules": [...], ...})}
The shared file (fold=True, the default) carries B x alpha / r and says lora_alpha = r, so the
update is B @ A at scale 1.0 whoever reads it: diffusers' `load_lora_adapter(path,
prefix="transformer")` reads the metadata only with use_safetensors=True (else it takes alpha = r),
Flux-style `lora_state_dict` refuses a file with both `.alpha` tensors and metadata, and ComfyUI
(its LongCat model is a Flux subclass; comfy/lora.py maps `transformer.<diffusers name>` onto row
slices of its fused qkv / linear1 weights) reads no metadata and scales by 1.0 without `.alpha`.
Training checkpoints use fold=False: B as trained and alpha in the metadata, so a resume continues
with the same dynamics, bit for bit.

LoKr file layout (`save_lora` of a LoKr model): LyCORIS's own, as its `save_weights` and
SimpleTuner write it, <m> being the module name with '.' replaced by '_':
    lycoris_<m>.lokr_w1 (a, c)   lycoris_<m>.lokr_w2 (b, d), or lycoris_<m>.lokr_w2_a (b, r) and
    lycoris_<m>.lokr_w2_b (r, d)   lycoris_<m>.alpha ()  float64
`lycoris_`, not `transformer.<module>`: LyCORIS's `create_lycoris_from_weights` finds modules under
its prefix only, while ComfyUI maps both spellings onto the same weights for Flux-family models
(comfy/lora.py model_lora_keys_unet), fused-qkv row slices included: comfy/lora.py calculate_weight
narrows the weight to the slice before any adapter adds its delta, so a LoKr on to_q lands on the q
rows as a LoRA does. Both readers scale by alpha / r when a factor is split and by 1 otherwise
(comfy/weight_adapter/lokr.py), so there is nothing to fold; alpha is float64 so that a resume reads
back the very scale it trained with.

`load_lora` reads all of these, and peft (`base_model.model.…lora_A.default.weight`, alpha from
adapter_config.json), diffusers (with or without `transformer.`), kohya-style `lora_down`/`lora_up`,
`diffusion_model.` keys, LyCORIS's LoRA on Linear layers and its LoKr with a split w1
(decompose_both, multiplied out on loading). Other algorithms (LoHa, OFT, Tucker factors, DoRA,
convolutions, ...) are refused naming the algorithm. One adapter per module: loading overwrites the
adapters of the modules a file names (in place when the shapes match, so an optimizer built on them
stays valid). To stack several files, `merge_and_unload` after each. `parse_lycoris_config` reads
SimpleTuner's lycoris_config JSON into LoKrSettings.
References: microsoft/LoRA loralib; Lightning-AI/litgpt lora.py; huggingface/peft LoraConfig;
diffusers loaders/peft.py; Comfy-Org/ComfyUI comfy/lora.py, comfy/weight_adapter/lora.py and
lokr.py; KohakuBlueleaf/LyCORIS lycoris/modules/lokr.py and lycoris/wrapper.py; bghira/SimpleTuner
simpletuner/examples/longcat-image-edit.lycoris-lokr.
"""

import difflib
import json
import math
import os
import re
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
FEEDFORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
DEFAULT_TARGETS = (*ATTENTION_TARGETS, *FEEDFORWARD_TARGETS)
# Every Linear of the LongCat transformer, by the names of diffusers, the checkpoint and model.py.
LINEAR_TARGETS = (
    *DEFAULT_TARGETS,
    "x_embedder",
    "context_embedder",
    "timestep_embedder.linear_1",
    "timestep_embedder.linear_2",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "norm_out.linear",
    "proj_mlp",
    "proj_out",
)
# The rest of the peft LoraConfig diffusers writes into lora_adapter_metadata (plain LoRA).
PEFT_REST = dict(
    bias="none",
    use_dora=False,
    use_rslora=False,
    init_lora_weights=True,
    rank_pattern={},
    alpha_pattern={},
)
FILE_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")  # stripped when loading
FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # found in a folder
# Tensor names of adapters that lora.py does not implement (LyCORIS lycoris/modules/*.py
# weight_list, ComfyUI comfy/weight_adapter/*.py, peft's DoRA), so a file is refused by algorithm.
UNSUPPORTED = {
    r"\.hada_\w+$": "LoHa",
    r"\.lokr_t[12]$": "LoKr with Tucker factors (lokr_t1, lokr_t2)",
    r"\.(oft_\w+|rescale)$": "OFT / BOFT",
    r"\.(dora_scale|lora_magnitude_vector)(\.\w+)*$": "DoRA",
    r"\.lora_mid\.weight$": "LoCon with Tucker factors (lora_mid)",
    r"\.on_input$": "(IA)^3",
    r"\.diff(_b)?$": "full weight-difference",
    r"\.[wb]_norm$": "norm-layer",
    r"\.(a1|a2|b1|b2|bm)\.weight$": "GLoRA",
}


def _add_to_base(base: nn.Module, delta: torch.Tensor) -> None:
    """base.weight += delta (out, in), in float32, then cast back or requantized."""
    weight = getattr(base, "weight", None)
    if hasattr(base, "dequantize") and hasattr(base, "load_float_weight"):  # quant.QuantLinear
        w = base.dequantize().float()
        base.load_float_weight(w + delta.to(w.device))
    elif isinstance(weight, torch.Tensor) and weight.is_floating_point():
        with torch.no_grad():
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    else:
        raise ValueError(
            f"cannot merge an adapter into a {type(base).__name__}: it has neither a float "
            "`weight` nor `dequantize()` + `load_float_weight(w)`"
        )


def _device(base: nn.Module) -> torch.device:
    """Where the base layer's weight is (a QuantLinear keeps its weight in buffers)."""
    return next(t for t in [*base.parameters(), *base.buffers()]).device


class Adapter(nn.Module):
    """What LoRA and LoKr layers share (loralib's LoRALayer): a frozen `base` linear, the
    multiplier (set_lora_scale) and merging `scale * multiplier * delta()` into the base weight.
    A subclass sets `scale` and defines forward() and delta()."""

    def __init__(self, base: nn.Module, rank: int | None, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = 1.0
        self.multiplier = 1.0
        self.merged = False
        self.merged_factor = 0.0  # the scale * multiplier merge() added, for unmerge() to remove

    def delta(self) -> torch.Tensor:
        """The update (out, in) in float32, unscaled."""
        raise NotImplementedError

    def merge(self) -> None:
        """Add the update into the base weight (in float32, then cast or requantize); idempotent."""
        if not self.merged:
            self.merged_factor = self.scale * self.multiplier
            _add_to_base(self.base, self.merged_factor * self.delta())
            self.merged = True

    def unmerge(self) -> None:
        """Subtract what merge() added (exact up to rounding / requantization); idempotent."""
        if self.merged:
            _add_to_base(self.base, -self.merged_factor * self.delta())
            self.merged = False


class LoRALinear(Adapter):
    """`base(x) + multiplier * alpha / rank * lora_B(lora_A(dropout(x)))` around a frozen base."""

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dtype=torch.float32
    ):
        super().__init__(base, rank, alpha)
        device = _device(base)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.multiplier == 0:
            return y
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        # the update rounded as peft rounds it (scaled, then added): outputs match diffusers in bf16
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * (self.scale * self.multiplier)

    def delta(self) -> torch.Tensor:
        """B @ A (out, in) in float32, unscaled."""
        return self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m <= n and m * n = dim, LyCORIS's split of one side of a LoKr weight
    (lycoris/functional/general.py factorization): m = factor when it divides dim, else the largest
    divisor of dim that is at most sqrt(dim) and at most factor (-1: no bound)."""
    if factor == 0:
        raise ValueError("LoKr factor 0: use -1 (as square as possible) or a positive integer")
    if factor > 0 and dim % factor == 0:
        m = factor
    else:
        limit = math.isqrt(dim) if factor < 0 else min(factor, math.isqrt(dim))
        m = max(k for k in range(1, limit + 1) if dim % k == 0)
    return min(m, dim // m), max(m, dim // m)


class LoKrLinear(Adapter):
    """`base(x) + multiplier * scale * (lokr_w1 ⊗ w2) x` around a frozen base (LyCORIS LoKr), where
    w2 is `lokr_w2` when rank is None, else `lokr_w2_a @ lokr_w2_b`."""

    def __init__(
        self,
        base: nn.Module,
        w1_shape: tuple[int, int],
        w2_shape: tuple[int, int],
        rank: int | None,
        alpha: float,
        dtype=torch.float32,
    ):
        super().__init__(base, rank, alpha)
        (a, c), (b, d) = w1_shape, w2_shape
        assert (a * b, c * d) == (base.out_features, base.in_features), (w1_shape, w2_shape, base)
        device = _device(base)
        # LyCORIS's order and init (LokrModule.__init__): the w2 side first, and the factor that
        # multiplies every product, w2 or w2_b, at zero, so the update starts at 0
        if rank is None:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, device=device, dtype=dtype))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank, device=device, dtype=dtype))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        self.lokr_w1 = nn.Parameter(torch.empty(a, c, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.scale = 1.0 if rank is None else alpha / rank  # LyCORIS: a whole w2 ignores alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.multiplier == 0:
            return y
        # (w1 ⊗ w2) x = vec(w1 X w2^T) with X = x viewed as (c, d), row-major: two small matmuls
        w1 = self.lokr_w1.to(x.dtype)  # (a, c)
        h = x.unflatten(-1, (w1.shape[1], -1))  # (..., c, d)
        if self.rank is None:
            h = h @ self.lokr_w2.to(x.dtype).T  # (..., c, b)
        else:
            h = h @ self.lokr_w2_b.to(x.dtype).T  # (..., c, r)
            h = h @ self.lokr_w2_a.to(x.dtype).T  # (..., c, b)
        h = w1 @ h  # (..., a, b)
        return y + h.flatten(-2) * (self.scale * self.multiplier)

    def delta(self) -> torch.Tensor:
        """w1 ⊗ w2 (out, in) in float32, unscaled."""
        w1 = self.lokr_w1.detach().float()
        if self.rank is None:
            return torch.kron(w1, self.lokr_w2.detach().float())
        return torch.kron(w1, self.lokr_w2_a.detach().float() @ self.lokr_w2_b.detach().float())


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _lokr_layers(model: nn.Module) -> dict[str, LoKrLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoKrLinear)}


def _adapters(model: nn.Module) -> dict[str, Adapter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapter)}


def _targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """The modules whose dotted name ends with a target (on a '.' boundary), checked Linear-like."""
    names = [
        n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)
    ]
    if not names:
        raise ValueError(f"no module of the model matches the LoRA targets {list(targets)}")
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, (LoRALinear, LoKrLinear)):
            kind = "LoRA" if isinstance(m, LoRALinear) else "LoKr"
            raise ValueError(f"{name} already has a {kind} adapter")
        if not hasattr(m, "in_features") or not hasattr(m, "out_features"):
            raise ValueError(f"LoRA target {name} is a {type(m).__name__}, not a Linear")
    return names


def inject_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 16,
    targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Wrap every module whose dotted name ends with a target (on a '.' boundary) in LoRALinear."""
    names = _targets(model, targets)
    for name in names:
        _set(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, dtype))
    return names


@dataclass
class LoKrSettings:
    """One LoKr for every target, in lycoris_config's names; the defaults are create_lycoris's."""

    linear_dim: int = 4  # the rank r of w2 = w2_a @ w2_b, which stays whole if r >= max(b, d) / 2
    linear_alpha: float = 1.0  # scale alpha / r when w2 is split (alpha 0 means r)
    factor: int = -1  # how each side splits (`factorization`); -1: as square as possible
    full_matrix: bool = False  # keep w2 whole whatever linear_dim is
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-name suffixes, as for inject_lora


def inject_lokr(model: nn.Module, settings: LoKrSettings, dtype=torch.float32) -> list[str]:
    """Wrap every module whose dotted name ends with one of settings.targets in a LoKrLinear whose
    shapes, split and alpha are those of LyCORIS's LokrModule on that Linear."""
    names = _targets(model, settings.targets)
    r = settings.linear_dim
    for name in names:
        m = model.get_submodule(name)
        a, b = factorization(m.out_features, settings.factor)
        c, d = factorization(m.in_features, settings.factor)
        split = r < max(b, d) / 2 and not settings.full_matrix
        # LyCORIS's alpha is r for a whole w2 and for alpha 0: the `.alpha` its files carry
        alpha = settings.linear_alpha if split and settings.linear_alpha else r
        _set(model, name, LoKrLinear(m, (a, c), (b, d), r if split else None, alpha, dtype))
    return names


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Only the adapters' tensors train (LoRA's lora_A / lora_B, LoKr's lokr_w*)."""
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or "lokr_" in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)} for every LoRA, and
    {"<module>.lokr_w1": (a, c), "<module>.lokr_w2" or "..lokr_w2_a" + "..lokr_w2_b"} for a LoKr."""
    keep = (".lora_A.", ".lora_B.", ".lokr_w")
    return {k: v for k, v in model.state_dict().items() if any(s in k for s in keep)}


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the runtime multiplier m of every adapter (0 = base model, 1 = as trained)."""
    for name, m in _adapters(model).items():
        if m.merged:
            raise ValueError(f"{name} is merged; unmerge before changing its scale")
        m.multiplier = scale


def merge(model: nn.Module) -> None:
    for m in _adapters(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in _adapters(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the bare base modules back (then another file can go on top)."""
    for name, m in _adapters(model).items():
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
    """Write a LoRA file (layout in the module docstring). From a model, rank and alpha are read off
    its layers; from a state dict, rank comes from the shapes and alpha defaults to rank. fold=True
    (the file people share) multiplies lora_B by alpha / rank and records alpha = rank, so every
    loader applies scale 1.0 and agrees; fold=False keeps B and alpha as trained (training
    checkpoints, to resume exactly). `metadata` adds top-level safetensors metadata entries (e.g.
    the training config), JSON-encoded. A LoKr goes to LyCORIS's layout instead (`_save_lokr`)."""
    model = model_or_state if isinstance(model_or_state, nn.Module) else None
    state = model_or_state if model is None else lora_state_dict(model)
    if any(".lokr_" in k for k in state):
        _save_lokr(path, state, rank, alpha, metadata, model)
        return
    dropout = 0.0
    if model is not None:
        layers = _lora_layers(model)
        if not layers:
            raise ValueError("the model has no LoRA layers to save")
        ranks, alphas = {m.rank for m in layers.values()}, {m.alpha for m in layers.values()}
        if len(ranks) > 1 or len(alphas) > 1:
            raise ValueError(
                f"save_lora writes one rank and alpha; the model has ranks {ranks}, alphas {alphas}"
            )
        if rank not in (None, *ranks) or alpha not in (None, *alphas):
            raise ValueError(
                f"rank={rank}, alpha={alpha} disagree with the model's "
                f"{ranks.pop()}, {alphas.pop()}"
            )
        rank, alpha = ranks.pop(), alphas.pop()
        dropout = getattr(next(iter(layers.values())).lora_dropout, "p", 0.0)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    shapes = {state[f"{m}.lora_A.weight"].shape[0] for m in modules}
    if rank is None:
        rank = shapes.pop() if len(shapes) == 1 else None
    if rank is None or shapes - {rank}:
        raise ValueError(
            f"save_lora writes one rank; the lora_A tensors have ranks {sorted(shapes)}"
        )
    alpha = float(rank if alpha is None else alpha)
    tensors = {f"transformer.{k}": v.detach().float().contiguous().cpu() for k, v in state.items()}
    if fold:
        tensors = {k: v * (alpha / rank) if ".lora_B." in k else v for k, v in tensors.items()}
        alpha = float(rank)
    config = {"r": rank, "lora_alpha": alpha, "target_modules": modules, "lora_dropout": dropout}
    config.update(PEFT_REST)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta["format"] = "pt"
    meta["lora_adapter_metadata"] = json.dumps(
        {f"transformer.{k}": v for k, v in config.items()}, sort_keys=True
    )
    safetensors.torch.save_file(tensors, os.fspath(path), metadata=meta)


def _lycoris_name(module: str) -> str:
    """LyCORIS's name for a module of the model it wraps (lycoris/wrapper.py, LORA_PREFIX)."""
    return "lycoris_" + module.replace(".", "_")


def _save_lokr(path, state, rank, alpha, metadata, model: nn.Module | None = None) -> None:
    """A LoKr file, as LyCORIS's save_weights writes it (module docstring). From a model, each
    module's alpha is its layer's; from a state dict it is `alpha`, by default the rank (scale 1, as
    for a LoRA state dict). A whole w2 ignores alpha."""
    if any(".lora_" in k for k in state):
        raise ValueError("save_lora writes one kind of adapter; this one has LoRA and LoKr tensors")
    if rank is not None or (model is not None and alpha is not None):
        raise ValueError(
            "a LoKr's ranks and alphas are read off its layers or shapes; pass neither"
        )
    modules = sorted({k.rsplit(".lokr_", 1)[0] for k in state})
    if len({_lycoris_name(m) for m in modules}) < len(modules):
        raise ValueError(f"two of the modules {modules} have the same LyCORIS name ('.' -> '_')")
    if model is not None:
        alphas = {n: float(m.alpha) for n, m in _lokr_layers(model).items()}
    else:
        ranks = {m: state[f"{m}.lokr_w2_b"].shape[0] for m in modules if f"{m}.lokr_w2_b" in state}
        alphas = {m: float(alpha if alpha is not None else ranks.get(m, 1)) for m in modules}
    tensors = {}
    for k, v in state.items():
        module, part = k.rsplit(".lokr_", 1)
        tensors[f"{_lycoris_name(module)}.lokr_{part}"] = v.detach().float().contiguous().cpu()
    for m in modules:  # float64: a resume reads back the very alpha it trained with
        tensors[f"{_lycoris_name(m)}.alpha"] = torch.tensor(alphas[m], dtype=torch.float64)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta["format"] = "pt"
    safetensors.torch.save_file(tensors, os.fspath(path), metadata=meta)


def _read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, peft config) of a file, the config from its metadata or adapter_config.json."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in FILE_NAMES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise ValueError(f"{path} holds none of {FILE_NAMES}")
        path = found[0]
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle
            raise ValueError(
                f"{path}: a PyTorch pickle (.pt/.bin/.ckpt), which is never loaded (it can run "
                "code): convert it to safetensors"
            )
        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except (OSError, safetensors.SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors LoRA ({str(e).splitlines()[0][:120]})"
        ) from None
    where = f"{path}: lora_adapter_metadata"
    beside = os.path.join(os.path.dirname(path), "adapter_config.json")
    if not config and os.path.isfile(beside):
        where = beside
        try:
            with open(beside) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{beside}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: a JSON object of peft settings, not {type(config).__name__}")
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    _check_config(config, where)
    return tensors, config


def _check_config(config: dict, where: str) -> None:
    """The peft settings a load uses, checked: an alpha is a finite number, use_rslora a bool."""

    def number(value) -> bool:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and math.isfinite(value) and abs(value) < 1e30

    if "lora_alpha" in config and not number(config["lora_alpha"]):
        raise ValueError(f"{where}: lora_alpha = {config['lora_alpha']!r}: not a finite number")
    for key in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(number(v) for v in pattern.values()):
            raise ValueError(f"{where}: {key} = {pattern!r}: not a mapping of names to numbers")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{where}: use_rslora = {config['use_rslora']!r}: true or false")


def read_lora(path: str | os.PathLike) -> tuple[str, dict[str, dict], dict]:
    """(path, {module: {"A": (key, tensor), "B": ..., "alpha": ...}}, config) of a LoRA file (ours,
    diffusers, peft, kohya-dotted), or {module: {"w1": ..., "w2" or "w2_a" + "w2_b", "alpha": ...}}
    for a LoKr, each tensor checked to be a plain, finite LoRA or LoKr tensor. A LyCORIS module
    name (`lycoris_<name with . as _>`) stays as it is: check_lora and load_lora find it."""
    tensors, config = _read_file(path)
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters are not supported")
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    found: dict[str, dict] = {}
    for key, t in tensors.items():
        k = re.sub(
            r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key
        )  # peft's lora_A.<name>.weight
        k = k.replace(".lora_down.weight", ".lora_A.weight").replace(
            ".lora_up.weight", ".lora_B.weight"
        )
        while k.startswith(FILE_PREFIXES):
            k = k.split(".", 2)[2] if k.startswith("base_model.model.") else k.split(".", 1)[1]
        match = re.fullmatch(r"(.+)\.(?:lora_(A|B)\.weight|(alpha)|lokr_(w[12](?:_[ab])?))", k)
        if match is None:
            algorithm = next((a for end, a in UNSUPPORTED.items() if re.search(end, key)), None)
            if algorithm is not None:
                raise ValueError(f"{path}: {key}: {algorithm} adapters are not supported")
            raise ValueError(
                f"{path}: {key} is neither a plain LoRA tensor (<module>.lora_A/lora_B.weight, "
                ".alpha) nor a LoKr one (.lokr_w1, .lokr_w2, .lokr_w2_a, .lokr_w2_b)"
            )
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{path}: {key} holds NaN, inf or non-float values")
        part = match[2] or match[3] or match[4]
        if part == "alpha" and t.numel() != 1:
            raise ValueError(f"{path}: {key}: an alpha is one number, not {tuple(t.shape)}")
        if part == "alpha" and not abs(t.item()) < 1e30:  # finite, and no overflow once scaled
            raise ValueError(f"{path}: {key}: alpha {t.item():g} is out of range")
        if part != "alpha" and t.ndim != 2:
            raise ValueError(f"{path}: {key}: {t.ndim}-D, a convolution's adapter (not supported)")
        if part in found.setdefault(match[1], {}):  # e.g. transformer.X and base_model.model.X
            raise ValueError(f"{path}: {key} and {found[match[1]][part][0]} are the same tensor")
        found[match[1]][part] = (key, t)
    return os.fspath(path), found, config


def _module_names(model: nn.Module, path: str, found: dict[str, dict]) -> dict[str, str]:
    """{module as the file names it: module of the model}. Only the model's names can undo
    LyCORIS's `lycoris_` + name with '.' replaced by '_'."""
    modules = dict(model.named_modules())
    flat: dict[str, list[str]] = {}
    for n in modules:
        flat.setdefault(_lycoris_name(n), []).append(n)
    names = {}
    for name, parts in found.items():
        candidates = [name] if name in modules or name not in flat else flat[name]
        if len(candidates) > 1:
            key = next(iter(parts.values()))[0]
            raise ValueError(f"{path}: {key}: {name} may be any of the modules {candidates}")
        names[name] = candidates[0]
    if len(set(names.values())) < len(names):
        raise ValueError(f"{path}: names some module twice (as `transformer.…` and `lycoris_…`)")
    return names


def _lokr_shapes(path: str, name: str, parts: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of w1 and w2 a file gives a LoKr module; a split factor's halves must pair up."""
    shapes = []
    for w in ("w1", "w2"):
        if w in parts:
            shapes.append(tuple(parts[w][1].shape))
        elif f"{w}_a" in parts and f"{w}_b" in parts:
            (key_a, a), (key_b, b) = parts[f"{w}_a"], parts[f"{w}_b"]
            if a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"{path}: {key_b}: {b.shape[0]} rows, {key_a} {a.shape[1]} columns"
                )
            shapes.append((a.shape[0], b.shape[1]))
        else:
            raise ValueError(
                f"{path}: module {name!r} needs lokr_{w}, or lokr_{w}_a and lokr_{w}_b"
            )
    return shapes[0], shapes[1]


def check_lora(model: nn.Module, path: str, found: dict[str, dict], config: dict) -> None:
    """Every module a LoRA or LoKr file names exists in `model` as a Linear, unmerged, with matching
    shapes. Works on a meta-device model, so a file can be checked before any weight is loaded."""
    modules, names = dict(model.named_modules()), _module_names(model, path, found)
    for name in sorted(found):
        parts = found[name]
        key, m = next(iter(parts.values()))[0], modules.get(names[name])
        if m is None:
            raise ValueError(
                f"{path}: {key}: the model has no module {name!r} (a LoRA for another model?)"
            )
        if not hasattr(m, "in_features") or not hasattr(m, "out_features"):
            raise ValueError(
                f"{path}: {key}: module {name!r} is a {type(m).__name__}, not a Linear"
            )
        if isinstance(m, (LoRALinear, LoKrLinear)) and m.merged:
            raise ValueError(
                f"{path}: {key}: module {name!r} has a merged adapter; unmerge it first"
            )
        if any(p.startswith("w") for p in parts):
            if "A" in parts or "B" in parts:
                raise ValueError(f"{path}: {key}: module {name!r} has both LoRA and LoKr tensors")
            (a, c), (b, d) = _lokr_shapes(path, name, parts)
            if (a * b, c * d) != (m.out_features, m.in_features):
                raise ValueError(
                    f"{path}: {key}: lokr_w1 {(a, c)} ⊗ lokr_w2 {(b, d)} is {(a * b, c * d)}, "
                    f"module {name!r} is {(m.out_features, m.in_features)}"
                )
            continue
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"{path}: {key}: module {name!r} needs both lora_A and lora_B")
        (key_a, a), (key_b, b) = parts["A"], parts["B"]
        if a.shape[0] == 0:
            raise ValueError(f"{path}: {key_a}: rank 0 (no rows): not a LoRA")
        for k, t, expected in (
            (key_a, a, (a.shape[0], m.in_features)),
            (key_b, b, (m.out_features, a.shape[0])),
        ):
            if tuple(t.shape) != expected:
                raise ValueError(f"{path}: {k}: expected shape {expected}, got {tuple(t.shape)}")


def load_lora(model: nn.Module, path: str | os.PathLike, scale: float = 1.0) -> list[str]:
    """Load a LoRA or LoKr file (ours, diffusers, peft, kohya-dotted, LyCORIS) into `model`,
    injecting adapters where needed, at multiplier `scale`. Every key is checked against the model
    before anything changes; returns the adapted module names."""
    path, found, config = read_lora(path)
    check_lora(model, path, found, config)
    modules, names = dict(model.named_modules()), _module_names(model, path, found)
    for file_name, parts in found.items():
        name = names[file_name]
        m = modules[name]
        if "A" not in parts:
            _load_lokr(model, name, m, parts).multiplier = scale
            continue
        (_, a), (_, b) = parts["A"], parts["B"]
        r = a.shape[0]
        alpha = parts["alpha"][1].item() if "alpha" in parts else _alpha_for(name, r, config)
        if (
            isinstance(m, LoRALinear) and m.rank == r
        ):  # reuse it: an optimizer built on it stays valid
            layer, layer.alpha = m, alpha
        else:
            base = m.base if isinstance(m, (LoRALinear, LoKrLinear)) else m
            p = getattr(m.lora_dropout, "p", 0.0) if isinstance(m, LoRALinear) else 0.0
            layer = LoRALinear(base, r, alpha, dropout=p)
            _set(model, name, layer)
        # rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r), not alpha / r
        layer.scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        layer.multiplier = scale
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    return sorted(names.values())


def _load_lokr(model: nn.Module, name: str, m: nn.Module, parts: dict) -> LoKrLinear:
    """Put a file's LoKr tensors into module `name`, with the scale ComfyUI (comfy/weight_adapter/
    lokr.py) and LyCORIS apply: alpha / r when a factor is split (r its rank), else 1, and 1 without
    an `.alpha`. A split w1 (LyCORIS's decompose_both) is multiplied out."""
    t = {p: v.float() for p, (_, v) in parts.items() if p != "alpha"}
    w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]  # (a, c)
    rank = t["w2_b"].shape[0] if "w2_b" in t else None
    alpha = parts["alpha"][1].item() if "alpha" in parts else None
    if (
        rank is None and "w1_b" in t and alpha is not None
    ):  # only w1 was split: its scale goes in it
        w1 = w1 * (alpha / t["w1_b"].shape[0])
    alpha = float(rank or 1) if alpha is None else alpha
    w2_shape = tuple(t["w2"].shape) if rank is None else (t["w2_a"].shape[0], t["w2_b"].shape[1])
    if isinstance(m, LoKrLinear) and m.rank == rank and m.lokr_w1.shape == w1.shape:  # reuse it
        layer = m
    else:
        base = m.base if isinstance(m, (LoRALinear, LoKrLinear)) else m
        layer = LoKrLinear(base, tuple(w1.shape), w2_shape, rank, alpha)
        _set(model, name, layer)
    layer.alpha = alpha
    layer.scale = 1.0 if rank is None else alpha / rank
    with torch.no_grad():
        layer.lokr_w1.copy_(w1)
        for p in ("w2", "w2_a", "w2_b"):
            if p in t:
                getattr(layer, f"lokr_{p}").copy_(t[p])
    return layer


def _alpha_for(name: str, rank: int, config: dict) -> float:
    """peft's alpha for a module: alpha_pattern (full name or '.'-suffix), lora_alpha, or rank."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        pattern = pattern.removeprefix("^")
        if name == pattern or name.endswith("." + pattern):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


# ---- SimpleTuner's lycoris_config ----------------------------------------------------------------

# apply_preset.target_module -> targets. LyCORIS wraps every Linear inside a module of a listed
# class (lycoris/wrapper.py LycorisNetwork); these are the classes whose Linears name suffixes can
# pick out. Block classes cannot be: no suffix tells a joint block's attn.to_q from a single one's.
LYCORIS_CLASSES = {
    "LongCatImageTransformer2DModel": LINEAR_TARGETS,  # the root: every Linear (SimpleTuner's)
    "Linear": LINEAR_TARGETS,  # the first class of LyCORIS's default list
    "LongCatImageAttention": ATTENTION_TARGETS,
    "FeedForward": FEEDFORWARD_TARGETS,
}
# Keys that cannot change a LoKr on Linear layers: accepted, and reported as ignored, with why.
LYCORIS_IGNORED = {
    "bypass_mode": "lora.py always computes base(x) + ΔW x, which is LyCORIS's bypass mode",
    "dropout": "LyCORIS's LoKr does not implement it",
    "use_tucker": "Tucker factors are for convolutions",
    "use_cp": "Tucker factors are for convolutions",
    "use_conv_cp": "Tucker factors are for convolutions",
    "disable_conv_cp": "Tucker factors are for convolutions",
    "conv_dim": "the LongCat transformer has no convolutions",
    "conv_alpha": "the LongCat transformer has no convolutions",
    "wd_on_output": "dora_wd's setting",
    "block_size": "DyLoRA's setting",
    "constraint": "OFT's setting",
    "rescaled": "OFT's setting",
    "tlora_min_rank": "T-LoRA's setting",
    "tlora_alpha": "T-LoRA's setting",
}
# Keys whose other values would change the result, with the one value lora.py implements.
LYCORIS_FIXED = {
    "multiplier": 1.0,  # the training multiplier; files are applied at 1.0
    "decompose_both": False,
    "use_scalar": False,
    "rank_dropout": 0.0,
    "module_dropout": 0.0,
    "dora_wd": False,
    "rs_lora": False,
    "unbalanced_factorization": False,
    "train_norm": False,
    "preset": "full",  # the default; a preset file may set target_module
}
LYCORIS_SETTINGS = ("algo", "linear_dim", "linear_alpha", "factor", "full_matrix", "apply_preset")
PRESET_IGNORED = {
    "enable_conv": "the LongCat transformer has no convolutions",
    "unet_target_module": "read by LyCORIS's kohya front end, not by create_lycoris",
    "unet_target_name": "read by LyCORIS's kohya front end, not by create_lycoris",
    "text_encoder_target_module": "read by LyCORIS's kohya front end, not by create_lycoris",
    "text_encoder_target_name": "read by LyCORIS's kohya front end, not by create_lycoris",
    "lora_prefix": "LoKr files are written with LyCORIS's default `lycoris_` prefix",
}


def _bool(key: str, value) -> bool:
    """true or false, as JSON or as a string (LyCORIS's str_bool would read 0 or "no" as true)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() not in ("true", "false"):
        raise ValueError(f"lycoris_config: {key} = {value!r}: write true or false")
    return str(value).lower() == "true"


def _integer(key: str, value) -> int:
    """An integer-valued number (SimpleTuner reads linear_dim and linear_alpha with int(), which
    would drop a fraction silently; LyCORIS reads factor with int())."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"lycoris_config: {key} = {value!r}: must be an integer")
    return int(value)


def _check_keys(where: str, config: dict, allowed: tuple[str, ...], warnings: list[str]) -> None:
    """An unknown key, or a LYCORIS_FIXED one with another value, raises; an ignored one warns."""
    for key, value in config.items():
        if key in LYCORIS_FIXED:
            expected = LYCORIS_FIXED[key]
            if isinstance(expected, bool):
                value = _bool(where + key, value)
            elif isinstance(expected, float):
                value = float(value or 0)
            if value != expected:
                raise ValueError(
                    f"lycoris_config: {where}{key} = {value!r}: only {expected!r} works"
                )
        elif key in LYCORIS_IGNORED:
            warnings.append(f"lycoris_config: {where}{key} is ignored: {LYCORIS_IGNORED[key]}")
        elif key not in allowed:
            close = difflib.get_close_matches(key, [*allowed, *LYCORIS_FIXED, *LYCORIS_IGNORED], 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"lycoris_config: {where}{key} is not a key lora.py knows{hint}")


def parse_lycoris_config(config: dict) -> tuple[LoKrSettings, list[str]]:
    """(LoKrSettings, warnings) of a SimpleTuner `lycoris_config` dict, read as SimpleTuner's
    trainer and LyCORIS's `create_lycoris` read it. Raises a one-line ValueError naming the key for
    an algo other than lokr, a value that would change the result, or an unknown key; the warnings
    list the keys accepted but ignored, with the reason."""
    warnings: list[str] = []
    _check_keys("", config, LYCORIS_SETTINGS, warnings)
    preset = dict(config.get("apply_preset") or {})
    classes = preset.pop("target_module", ["Linear"])  # LyCORIS's default list: every Linear
    algo_map = preset.pop("module_algo_map", {})
    for key in preset:
        if key not in PRESET_IGNORED:
            raise ValueError(
                f"lycoris_config: apply_preset.{key} is not supported "
                "(target_module and module_algo_map are)"
            )
        warnings.append(f"lycoris_config: apply_preset.{key} is ignored: {PRESET_IGNORED[key]}")
    top = {
        "algo": config.get("algo", "lora"),  # create_lycoris's defaults
        "dim": config.get("linear_dim", 4),
        "alpha": config.get("linear_alpha", 1),
        "factor": config.get("factor", -1),
        "full_matrix": config.get("full_matrix", False),
    }
    # Each class's Linears take the top-level settings, or its module_algo_map entry's (LyCORIS's
    # create_single_module: `dim or linear_dim`, `alpha or linear_alpha`, the others as given); the
    # map's classes are wrapped too.
    chosen = {}
    for cls in dict.fromkeys([*classes, *algo_map]):
        if cls not in LYCORIS_CLASSES:
            raise ValueError(
                f"lycoris_config: apply_preset names the class {cls!r}; "
                f"lora.py knows {list(LYCORIS_CLASSES)}"
            )
        entry = algo_map.get(cls, {})
        where = f"apply_preset.module_algo_map.{cls}."
        _check_keys(where, entry, ("algo", "dim", "alpha", "factor", "full_matrix"), warnings)
        chosen[cls] = {
            **top,
            **{k: entry[k] for k in ("algo", "factor", "full_matrix") if k in entry},
        }
        chosen[cls]["dim"] = entry.get("dim") or top["dim"]
        chosen[cls]["alpha"] = entry.get("alpha") or top["alpha"]
        if str(chosen[cls]["algo"]).lower() != "lokr":
            key = where + "algo" if "algo" in entry else "algo"
            raise ValueError(
                f"lycoris_config: {key} = {chosen[cls]['algo']!r} is not supported (only lokr)"
            )
    first = next(iter(chosen.values()))
    if any(c != first for c in chosen.values()):
        raise ValueError(
            f"lycoris_config: apply_preset.module_algo_map gives classes different settings "
            f"{chosen}; lora.py trains one"
        )
    dim = _integer("linear_dim", first["dim"])
    if dim < 1:
        raise ValueError(f"lycoris_config: linear_dim = {dim}: must be positive")
    settings = LoKrSettings(
        linear_dim=dim,
        linear_alpha=float(_integer("linear_alpha", first["alpha"])),
        factor=_integer("factor", first["factor"]),
        full_matrix=_bool("full_matrix", first["full_matrix"]),
        targets=tuple(dict.fromkeys(t for cls in chosen for t in LYCORIS_CLASSES[cls])),
    )
    return settings, warnings
