"""LongCat-Image(-Edit) by hand: the MM-DiT transformer (with gradient checkpointing and block
offload), the FLUX.1 VAE, latent packing and position ids, the flow-matching schedule, and loading
of the released checkpoints (safetensors, every byte checked). It imports no other file of minicat.

References
- LongCat-Image technical report, arXiv:2512.07584; checkpoints
  meituan-longcat/LongCat-Image{,-Dev,-Edit}.
- FLUX.1 (black-forest-labs/flux): double/single stream blocks, 3-axis RoPE, 2x2 latent packing,
  16-channel VAE.
- Rectified flow (Liu et al. 2022, Esser et al. 2024): x_t = (1 - s) x0 + s eps, the model predicts
  eps - x0.
- diffusers: LongCatImageTransformer2DModel (models/transformers/transformer_longcat_image.py),
  AutoencoderKL, and pipelines/longcat_image/pipeline_longcat_image_edit.py (_pack_latents,
  prepare_pos_ids, calculate_shift). The tests hold every number here to them on the same weights.
Module attributes carry the released (diffusers) tensor names, so a checkpoint loads strictly with
no renaming.
Sections, in reading order: the transformer, the VAE, latents + ids + schedule, loading.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)


class CheckpointError(ValueError):
    """A checkpoint folder we cannot use; the message names the file or tensor and what to do."""


def _from_json(cls, path: Path):
    """A config dataclass from a diffusers config.json, ignoring its bookkeeping (`_class_name`)."""
    raw = read_json(path)
    known = {f.name for f in fields(cls)}
    return cls(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
    )


# --------------------------------------------------------------------------------------------------
# The transformer


@dataclass
class TransformerConfig:
    """transformer/config.json; defaults are the released LongCat-Image values (not FLUX's)."""

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 10  # joint (double-stream) blocks
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    pooled_projection_dim: int = 3584  # stored in the config, unused by the model
    axes_dims_rope: tuple = (16, 56, 56)  # (modality, row, col); sums to attention_head_dim


def rope(ids: torch.Tensor, axes_dims, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [S, head_dim] in float32 for positions ids [S, n_axes]; each angle twice."""
    # float64 angles keep positions ~1000 exact; MPS has no float64, so it gets float32 there.
    f64 = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=f64, device=ids.device) / d)  # (d/2,)
        angles.append(torch.outer(ids[:, i].to(f64), freqs))  # (S, d/2)
    angles = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)  # (S, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x0, x1) by its angle, in float32:
    (x0 cos - x1 sin, x1 cos + x0 sin)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
    turned = torch.stack([-x1, x0], dim=-1).flatten(-2)  # (B, S, H, D): each pair turned 90°
    return (x.float() * cos[:, None] + turned * sin[:, None]).to(x.dtype)


# The SDPA kernels attention() may use, with and without autograd (set_attention_backend);
# None: torch's choice.

ATTENTION_CHOICES = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention_backends(name: str) -> dict[bool, list | None]:
    """{grad enabled: the SDPA kernels allowed (None: torch's choice)} for a backend name. "auto" is
    torch's choice, except that cuDNN attention is never used where a backward pass will run: its
    backward crashed, and the tiny demo's loss went NaN, on an H200 with torch 2.11 (NaN gradients
    from cuDNN's SDPA backward are a known kind of failure: huggingface/diffusers issue 9768)."""
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"{name!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
    if name == "auto":
        return {
            True: [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
            False: None,
        }
    return dict.fromkeys((True, False), [ATTENTION_CHOICES[name]])


def set_attention_backend(name: str) -> None:
    """Choose the transformer's attention kernels (looked up per call: recomputation agrees)."""
    SDPA_BACKENDS.update(attention_backends(name))


# The kernels in use: "auto" until set_attention_backend says otherwise, so a program that uses this
# file without choosing never gets cuDNN's backward either.
SDPA_BACKENDS: dict[bool, list | None] = attention_backends("auto")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention, no mask: q, k, v [B, S, H, D] -> [B, S, H*D]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    backends = SDPA_BACKENDS[torch.is_grad_enabled()]
    if backends is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)  # (B, S, H*D)


def timestep_embedding(
    t: torch.Tensor, dim: int = 256, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of t [B] (already x1000) as [cos, sin] in float32 -> [B, dim]."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / half)  # (half,)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: LayerNorm without affine (eps 1e-6), then x * (1 + scale) + shift per sample."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class Modulation(nn.Module):
    """AdaLN-Zero `norm*.linear`: Linear(SiLU(temb)) in n chunks (shift, scale, gate, ...)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n, dim=-1)


class TimestepEmbedder(nn.Module):
    """`time_embed.timestep_embedder`: sinusoidal(256) -> linear_1 -> SiLU -> linear_2."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(timestep_embedding(t).to(dtype))))


class GELUProj(nn.Module):
    """`ff.net.0`: the MLP's input projection followed by tanh-GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class MLP(nn.Module):
    """`ff` / `ff_context`: Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D); net.1: a dropout slot."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """`attn`: q/k/v projections with per-head RMSNorm; `context=True` adds the text stream's
    projections and both output projections (a single block has its own `proj_out`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        if context:
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.norm_added_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6)
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)) for p in (to_q, to_k, to_v))  # (B, S, H, D)
        return norm_q(q), norm_k(k), v

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._heads(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)

    def qkv_context(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        projs = (self.add_q_proj, self.add_k_proj, self.add_v_proj)
        return self._heads(c, *projs, self.norm_added_q, self.norm_added_k)


class JointBlock(nn.Module):
    """`transformer_blocks.N`: separate weights for text and image, one attention over both."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = Modulation(dim, 6)
        self.norm1_context = Modulation(dim, 6)
        self.attn = Attention(dim, heads, head_dim, context=True)
        self.ff = MLP(dim)
        self.ff_context = MLP(dim)

    def forward(self, img, txt, temb, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(temb)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        q, k, v = self.attn.qkv(modulate(img, shift1, scale1))
        cq, ck, cv = self.attn.qkv_context(modulate(txt, c_shift1, c_scale1))
        q = apply_rope(torch.cat([cq, q], dim=1), cos, sin)  # (B, L+N, H, D)
        k = apply_rope(torch.cat([ck, k], dim=1), cos, sin)
        out = attention(q, k, torch.cat([cv, v], dim=1))
        txt_out, img_out = out.split([txt.shape[1], img.shape[1]], dim=1)
        # gated residuals, rounded as diffusers does (a fused addcmul differs by an ulp in bf16)
        img = img + gate1[:, None] * self.attn.to_out[0](img_out)
        img = img + gate2[:, None] * self.ff(modulate(img, shift2, scale2))
        txt = txt + c_gate1[:, None] * self.attn.to_add_out(txt_out)
        txt = txt + c_gate2[:, None] * self.ff_context(modulate(txt, c_shift2, c_scale2))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleBlock(nn.Module):
    """`single_transformer_blocks.N`: one stream [text; image], attention and MLP in parallel."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = Modulation(dim, 3)
        self.attn = Attention(dim, heads, head_dim, context=False)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(dim + 4 * dim, dim)

    def forward(self, x, temb, cos, sin):
        shift, scale, gate = self.norm(temb)
        h = modulate(x, shift, scale)
        q, k, v = self.attn.qkv(h)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        attn = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # (B, S, D)
        x = x + gate[:, None] * self.proj_out(torch.cat([attn, mlp], dim=-1))
        return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


# Selective checkpointing (checkpoint_keep_attention): attention is the costliest op to redo in the
# backward pass, and its output is only [B, S, D] per block: it is kept, the rest is recomputed.
ATTENTION_OPS = [
    getattr(torch.ops.aten, name).default
    for name in dir(torch.ops.aten)
    if name.startswith("_scaled_dot_product") and not name.endswith("backward")
]


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class BlockOffload:
    """The frozen weights of some blocks, kept in (pinned) CPU memory and copied to the device only
    while their block is in use. LongCatTransformer._run drives it and knows the direction: going
    forward it fetches block i before it runs and starts copying block i + 1, on a side stream,
    while i computes; in the backward pass a hook on block i's output fetches i again before its
    recomputation and starts copying i - 1. The copies are made outside the checkpointed region, so
    the forward pass and the recomputation run the same ops (selective checkpointing replays them by
    order). Trainable tensors (LoRA) stay on the device. Without checkpointing a training step keeps
    every block's weights alive for the backward pass and saves nothing. On a CPU "device" the
    copies are plain copies, which is how the tests hold it to bit-identity."""

    def __init__(self, blocks: list[nn.Module], device):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.host: dict[int, list] = {}  # block -> [(module, slots' name, name, CPU copy)]
        self.pending: dict[int, tuple] = {}  # block -> (device copies, CUDA event or None)
        self.installed: int | None = None  # the block whose weights are on the device now
        for i, block in enumerate(blocks):
            self.host[i] = []
            for m in block.modules():
                for kind in ("_parameters", "_buffers"):
                    slots = getattr(m, kind)
                    for name, t in list(slots.items()):
                        if t is None or t.requires_grad:
                            continue
                        cpu = t.detach().cpu()
                        if cuda:  # pinned on the chosen GPU: the current one may be another
                            with torch.cuda.device(self.device):
                                cpu = cpu.pin_memory()
                        self.host[i].append((m, kind, name, cpu))
                        slots[name] = None  # idle: nothing on the device; .to() skips it

    def fetch(self, i: int, ahead: int) -> None:
        """Put block i's weights in place (its prefetched copy, or one made now), then start copying
        block `ahead`'s. A block that is not offloaded needs nothing; the prefetch still starts."""
        if i in self.host and self.installed != i:
            if self.installed is not None:
                self.release(self.installed)
            self._start(i)
            copies, event = self.pending.pop(i)
            stream = None if event is None else torch.cuda.current_stream(self.device)
            if stream is not None:
                stream.wait_event(event)
            for (m, kind, name, _), t in zip(self.host[i], copies, strict=True):
                if stream is not None:  # made on the side stream, used on this one:
                    t.record_stream(stream)  # the allocator waits for this stream's use
                if kind == "_parameters":
                    t = nn.Parameter(t, requires_grad=False)
                getattr(m, kind)[name] = t
            self.installed = i
        self._start(ahead)

    def release(self, i: int) -> None:
        """Drop block i's device weights (what autograd saved for a backward pass stays alive)."""
        if self.installed == i:
            for m, kind, name, _ in self.host[i]:
                getattr(m, kind)[name] = None
            self.installed = None

    def _start(self, i: int) -> None:
        """Begin copying block i's weights to the device (on the side stream when there is one)."""
        if i in self.pending or i not in self.host or i == self.installed:
            return
        if self.stream is None:
            self.pending[i] = ([t.to(self.device, copy=True) for *_, t in self.host[i]], None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for *_, t in self.host[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = (copies, event)


class LongCatTransformer(nn.Module):
    """The LongCat-Image MM-DiT (root of transformer/*.safetensors)."""

    def __init__(self, config: TransformerConfig | None = None):
        super().__init__()
        c = self.config = config or TransformerConfig()
        heads, head_dim = c.num_attention_heads, c.attention_head_dim
        dim = heads * head_dim
        assert sum(c.axes_dims_rope) == head_dim, (
            f"axes_dims_rope {c.axes_dims_rope} must sum to {head_dim}"
        )
        assert c.patch_size == 1, (
            f"patch_size {c.patch_size}: only 1 exists (2x2 packing happens outside)"
        )
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.time_embed = nn.Module()
        self.time_embed.timestep_embedder = TimestepEmbedder(dim)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(dim, heads, head_dim) for _ in range(c.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleBlock(dim, heads, head_dim) for _ in range(c.num_single_layers)
        )
        self.norm_out = Modulation(dim, 2)  # chunks are (scale, shift), in that order
        self.proj_out = nn.Linear(dim, c.in_channels)
        self.gradient_checkpointing = False  # recompute each block in the backward pass ...
        self.checkpoint_keep_attention = False  # ... except its attention output
        self.offload: BlockOffload | None = None  # offload_blocks(): weights streamed from the CPU

    def forward(self, img, txt, sigma, img_ids, txt_ids) -> torch.Tensor:
        """img [B, N, 64], txt [B, L, joint_attention_dim], sigma [B] in [0, 1], img_ids [N, 3],
        txt_ids [L, 3] -> velocity [B, N, 64]."""
        img, txt = self.x_embedder(img), self.context_embedder(txt)
        temb = self.time_embed.timestep_embedder(sigma.to(img.dtype) * 1000, img.dtype)  # (B, D)
        ids = torch.cat([txt_ids, img_ids])  # (L+N, 3)
        cos, sin = rope(ids, self.config.axes_dims_rope)  # (L+N, head_dim), once for all blocks
        for i, block in enumerate(self.transformer_blocks):
            img, txt = self._run(i, block, img, txt, temb, cos, sin)
        x = torch.cat([txt, img], dim=1)  # (B, L+N, D): the single blocks see one stream
        first = len(self.transformer_blocks)  # block indices run on through the single blocks
        for i, block in enumerate(self.single_transformer_blocks, start=first):
            x = self._run(i, block, x, temb, cos, sin)
        scale, shift = self.norm_out(temb.to(x.dtype))
        return self.proj_out(modulate(x[:, txt.shape[1] :], shift, scale))

    def _run(self, i: int, block: nn.Module, *args):
        """Block i, checkpointed when training with gradient_checkpointing on. An offloaded block's
        weights are fetched before it runs and dropped after it, outside the checkpointed region."""
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        if self.offload is not None:
            self.offload.fetch(i, ahead=i + 1)  # going forward, block i + 1 runs next
        if checkpointed:
            kw = {}
            if self.checkpoint_keep_attention:
                kw["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_attention)
            out = checkpoint(block, *args, use_reentrant=False, **kw)
        else:
            out = block(*args)
        if self.offload is not None:
            self.offload.release(i)
            if checkpointed:
                self._fetch_before_recompute(i, out)
        return out

    def _fetch_before_recompute(self, i: int, out) -> None:
        """The backward pass recomputes block i once the gradient of its output is ready: a hook on
        that output fetches the block's weights first, and starts copying block i - 1, which comes
        next. A tensor hook runs before the node that made the tensor (torch.Tensor.register_hook),
        so the weights are in place when the recomputation starts. With two outputs (a joint block)
        it fires twice; the first fetches."""
        offload = self.offload
        for t in out if isinstance(out, tuple) else (out,):
            if t.requires_grad:
                t.register_hook(lambda grad: offload.fetch(i, ahead=i - 1))

    def offload_blocks(self, n: int, device) -> None:
        """Keep the frozen weights of the first n blocks in CPU memory, streamed to `device` while
        each runs (BlockOffload). Call it after LoRA is injected, on a model loaded on the CPU, then
        .to(device): the offloaded weights never reach the device whole."""
        blocks = [*self.transformer_blocks, *self.single_transformer_blocks]
        if not 0 < n <= len(blocks):
            raise ValueError(
                f"offload_blocks = {n}: choose 1 to {len(blocks)}, the model's number of blocks"
            )
        self.offload = BlockOffload(blocks[:n], device)

    def compile_blocks(self) -> None:
        """Regional compilation: each block compiled on its own (offload fetches stay outside it);
        the joint blocks share one compiled graph and the single blocks another (same code, weights
        as inputs), so it costs two compiles, not thirty."""
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            block.compile()


# --------------------------------------------------------------------------------------------------
# The VAE (FLUX.1 AutoencoderKL, diffusers names)


@dataclass
class VAEConfig:
    """vae/config.json; the defaults are the released (FLUX.1) VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159


class ResBlock(nn.Module):
    """`resnets.M`: GroupNorm -> SiLU -> conv3x3, twice, and a 1x1 shortcut if channels change."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class SpatialAttention(nn.Module):
    """`mid_block.attentions.0`: single-head self-attention over all pixels, with a residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x.flatten(2))  # (B, C, HW): normed in this layout, as diffusers does
        h = h.transpose(1, 2)  # (B, HW, C)
        q, k, v = (p(h)[:, None] for p in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """`mid_block`: resnet, attention, resnet at the lowest resolution."""

    def __init__(self, ch: int, groups: int, attn: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, groups), ResBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(ch, groups)] if attn else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """`downsamplers.0`: pad right/bottom by one, then a stride-2 conv3x3."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """`upsamplers.0`: nearest x2, then conv3x3."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resnets(cin: int, cout: int, n: int, groups: int) -> nn.ModuleList:
    """`down_blocks.N.resnets` / `up_blocks.N.resnets`: n ResBlocks, the first changing channels."""
    return nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, groups) for i in range(n))


class Encoder(nn.Module):
    """`encoder`: image [B, 3, H, W] -> moments [B, 2*latent, H/8, W/8]."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(nn.Module() for _ in range(n))
        for i, block in enumerate(self.down_blocks):  # resnets, then a downsampler (not last)
            block.resnets = resnets(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g)
            block.downsamplers = nn.ModuleList([Downsample(ch[i])] if i < n - 1 else [])
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            for m in [*block.resnets, *block.downsamplers]:
                x = m(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """`decoder`: latent [B, latent, h, w] -> image [B, 3, 8h, 8w]."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = tuple(reversed(c.block_out_channels))
        g = c.norm_num_groups
        n = len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(nn.Module() for _ in range(n))
        for i, block in enumerate(self.up_blocks):  # resnets, then an upsampler except at the top
            block.resnets = resnets(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g)
            block.upsamplers = nn.ModuleList([Upsample(ch[i])] if i < n - 1 else [])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            for m in [*block.resnets, *block.upsamplers]:
                x = m(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """The FLUX.1 autoencoder (vae/diffusion_pytorch_model.safetensors); images in [-1, 1]."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        config = config or VAEConfig()
        assert config.act_fn == "silu", f"act_fn {config.act_fn!r}: only silu is implemented"
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        k = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(k, k, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(k // 2, k // 2, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] -> the latent distribution's mean [B, 16, H/8, W/8], unnormalised."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments.chunk(2, dim=1)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent [B, 16, h, w] -> image [B, 3, 8h, 8w] in about [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def to_latent(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] -> the normalised latent the transformer sees: (mean - shift) * scale."""
    mean = vae.encode(x.to(next(vae.parameters()).dtype))
    return (mean - vae.config.shift_factor) * vae.config.scaling_factor


def from_latent(vae: VAE, z: torch.Tensor) -> torch.Tensor:
    """Normalised latent -> image in [-1, 1] (not clamped)."""
    raw = z / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(raw.to(next(vae.parameters()).dtype))


# --------------------------------------------------------------------------------------------------
# Latents, position ids, schedule


def pack(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: `b c (h 2) (w 2) -> b (h w) (c 2 2)`."""
    B, C, h, w = z.shape
    assert h % 2 == 0 and w % 2 == 0, f"latent size {h}x{w} must be even (pixels a multiple of 16)"
    z = z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return z.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w] (h, w in latent pixels): the exact inverse of pack."""
    B, N, D = x.shape
    assert N == (h // 2) * (w // 2), f"{N} tokens do not make a {h}x{w} latent"
    x = x.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(B, D // 4, h, w)


def text_ids(length: int, device=None) -> torch.Tensor:
    """Text positions (0, i, i) -> [L, 3]."""
    i = torch.arange(length, device=device, dtype=torch.float64)
    return torch.stack([torch.zeros_like(i), i, i], dim=-1)


def image_ids(h: int, w: int, text_len: int, modality: int, device=None) -> torch.Tensor:
    """Positions (modality, L + row, L + col) of an h x w token grid -> [h*w, 3].
    Modality 1 is the target, 2 the reference."""
    r = torch.arange(h, device=device, dtype=torch.float64)[:, None].expand(h, w)
    c = torch.arange(w, device=device, dtype=torch.float64)[None, :].expand(h, w)
    m = torch.full_like(r, modality)
    ids = torch.stack([m, r + text_len, c + text_len], dim=-1)  # (h, w, 3)
    return ids.reshape(h * w, 3)


def image_sequence(
    noisy: torch.Tensor, references: list[torch.Tensor], text_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transformer's image stream and position ids: the noised target's tokens (modality 1),
    then each clean reference's tokens. Reference k gets modality 2 + k on the same (row, col) grid
    as the target: k = 0 is the official edit input exactly; further references are told apart by
    the first RoPE axis alone, as frames are, and stay aligned with the target pixel for pixel.

    noisy [B, 16, h, w], each reference [B, 16, h, w] -> (tokens [B, N (1 + K), 64],
    img_ids [N (1 + K), 3], txt_ids [L, 3]) with N = h/2 * w/2 and K references."""
    _, _, h, w = noisy.shape
    device = noisy.device
    tokens = [pack(noisy)]  # (B, N, 64)
    ids = [image_ids(h // 2, w // 2, text_len, 1, device)]  # (N, 3)
    for k, ref in enumerate(references):
        tokens.append(pack(ref.to(noisy.dtype)))
        ids.append(image_ids(h // 2, w // 2, text_len, 2 + k, device))
    return torch.cat(tokens, dim=1), torch.cat(ids), text_ids(text_len, device)


def shift_mu(seq_len: int, sched: dict) -> float:
    """Resolution-dependent shift: linear in the target token count between the scheduler's anchors
    (diffusers' calculate_shift)."""
    x0, x1 = sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096)
    y0, y1 = sched.get("base_shift", 0.5), sched.get("max_shift", 1.15)
    m = (y1 - y0) / (x1 - x0)
    return seq_len * m + (y0 - m * x0)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """Exponential time shift: logit(sigma') = logit(sigma) + mu."""
    e = torch.tensor(math.exp(mu), dtype=sigma.dtype)  # a tensor: `float / tensor` rounds otherwise
    return e / (e + (1 / sigma - 1))


def static_shift(s: float, sigma: torch.Tensor) -> torch.Tensor:
    """A fixed shift s: sigma' = s sigma / (1 + (s - 1) sigma) (s = 1 changes nothing)."""
    return s * sigma / (1 + (s - 1) * sigma)


def schedule(steps: int, seq_len: int, sched: dict) -> torch.Tensor:
    """sigmas [steps + 1] in float32, 1 (noise) down to 0, shifted for seq_len target tokens."""
    # numpy's linspace, as diffusers: torch's rounds some steps differently in float32
    sigmas = torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps).astype(np.float32))
    if sched.get("use_dynamic_shifting", True):
        sigmas = time_shift(shift_mu(seq_len, sched), sigmas)
    else:
        sigmas = static_shift(sched.get("shift", 1.0), sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# --------------------------------------------------------------------------------------------------
# Loading: safetensors read by hand, every byte checked, names and shapes strict

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, which is always an object."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{path}: a JSON object, not {type(found).__name__} (damaged?)")
    return found


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component: those its shard index names, or else the one file."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = set(read_json(index[0]).get("weight_map", {}).values())
        files = [folder / s for s in sorted(shards)]
    else:
        files = sorted(folder.glob("*.safetensors"))
    missing = [f for f in files if not f.exists()]
    if not files or missing:
        raise CheckpointError(
            f"{folder}: {missing[0].name if missing else 'no *.safetensors file'} is missing"
        )
    return files


def read_header(file: Path) -> dict:
    """A safetensors file's table {name: {dtype, shape, data_offsets}} with absolute offsets,
    checked against the file: an 8-byte length, then JSON; each tensor's bytes lie inside the file
    and match its shape."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise CheckpointError(f"{file}: not a safetensors file (header of {n} bytes in {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        dtype, (start, end) = SAFETENSORS_DTYPES.get(info.get("dtype")), info["data_offsets"]
        nbytes = math.prod(info["shape"]) * (dtype.itemsize if dtype else 0)
        if dtype is None or not 0 <= start <= end or end - start != nbytes:
            raise CheckpointError(f"{file}: tensor {name} has a corrupt header entry {info}")
        if 8 + n + end > size:
            raise CheckpointError(
                f"{file}: truncated at {size} bytes ({name} ends at {8 + n + end}); fetch it again"
            )
        info["data_offsets"] = [8 + n + start, 8 + n + end]  # absolute positions in the file
    return header


def read_tensor(fh, info: dict, staging: torch.Tensor) -> torch.Tensor:
    """One tensor by a plain read (no mmap: only what we keep counts as resident) into a reusable
    staging buffer, so a weight quantized on arrival leaves no freed hole of its size behind."""
    start, end = info["data_offsets"]
    fh.seek(start)
    if (got := fh.readinto(memoryview(staging.numpy())[: end - start])) != end - start:
        raise CheckpointError(
            f"{fh.name}: read {got} of {end - start} bytes at {start} (the file changed?)"
        )
    return staging[: end - start].view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def load_weights(
    model: nn.Module, folder: Path, dtype: torch.dtype, device, convert=None
) -> nn.Module:
    """Fill a meta-device model from a folder of safetensors, strictly (every name and shape must
    match), one tensor at a time so peak memory stays at the model's size. `convert(model)` may swap
    modules first (quantization): their `_load_from_state_dict` then sees each float tensor as it
    arrives."""
    headers = {f: read_header(f) for f in weight_files(folder)}
    seen = {name: (info, f) for f, header in headers.items() for name, info in header.items()}
    for name, t in model.state_dict().items():
        info, file = seen.get(name, (None, folder))
        if info is None or info["shape"] != list(t.shape):
            got = "missing" if info is None else f"of shape {info['shape']}"
            raise CheckpointError(
                f"{file}: tensor {name} is {got}, expected {list(t.shape)} (another model?)"
            )
    if extra := sorted(set(seen) - set(model.state_dict())):
        raise CheckpointError(
            f"{seen[extra[0]][1]}: unexpected tensor {extra[0]} (a different model or config?)"
        )
    if convert is not None:
        convert(model)
    staging = torch.empty(
        max(e - s for s, e in (i["data_offsets"] for i, _ in seen.values())), dtype=torch.uint8
    )
    for file, header in headers.items():
        with open(file, "rb") as fh:
            for name, info in header.items():
                t = read_tensor(fh, info, staging).to(device)
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                module.load_state_dict(
                    {leaf: t.to(dtype) if t.is_floating_point() else t}, strict=False, assign=True
                )
                kept = getattr(module, leaf)
                shared = kept is not None and (
                    kept.untyped_storage().data_ptr() == staging.untyped_storage().data_ptr()
                )
                if shared:  # kept as read: it needs memory of its own, the buffer is reused
                    kept.data = kept.data.clone()
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    assert not left, f"not loaded: {left[:3]}"
    return model.eval().requires_grad_(False)


def load_transformer(
    path: Path, dtype=torch.bfloat16, device="cpu", convert=None
) -> LongCatTransformer:
    config = _from_json(TransformerConfig, Path(path) / "transformer/config.json")
    with torch.device("meta"):
        model = LongCatTransformer(config)
    return load_weights(model, Path(path) / "transformer", dtype, device, convert)


def load_vae(path: Path, dtype=torch.float32, device="cpu") -> VAE:
    config = _from_json(VAEConfig, Path(path) / "vae/config.json")
    with torch.device("meta"):
        model = VAE(config)
    return load_weights(model, Path(path) / "vae", dtype, device)


# --------------------------------------------------------------------------------------------------
# The released checkpoint folder (diffusers' layout): what it must hold and what it says

PIPELINES = {"LongCatImageEditPipeline": "edit", "LongCatImagePipeline": "t2i"}
REQUIRED = [
    "model_index.json",
    "transformer/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer",
]
# Where the Qwen2-VL image processor's config may be, in the order it is looked for.
IMAGE_PROCESSOR_DIRS = ("text_processor", "tokenizer", "text_encoder")


def check_checkpoint(path: Path) -> Path:
    """The folder, if it has every file of the released layout; else a CheckpointError naming the
    first one missing."""
    for need in REQUIRED:
        if not (path / need).exists():
            raise CheckpointError(f"{path} is not a LongCat-Image checkpoint: {need} is missing")
    return path


def read_flavour(path: Path) -> str:
    """'edit' or 't2i', from model_index.json's pipeline class."""
    name = read_json(Path(path) / "model_index.json").get("_class_name")
    if name not in PIPELINES:
        raise CheckpointError(
            f"{path}/model_index.json: _class_name {name!r} is not one of {sorted(PIPELINES)}"
        )
    return PIPELINES[name]


def read_scheduler(path: Path) -> dict:
    return read_json(Path(path) / "scheduler/scheduler_config.json")


def read_transformer_config(path: Path) -> TransformerConfig:
    return _from_json(TransformerConfig, Path(path) / "transformer/config.json")


def text_encoder_files(path: Path) -> dict[str, Path]:
    """The Qwen2.5-VL folders: weights (every file's header checked, so a truncated or corrupt one
    is named here, not deep inside transformers), tokenizer and image processor."""
    found = [
        path / d for d in IMAGE_PROCESSOR_DIRS if (path / d / "preprocessor_config.json").exists()
    ]
    if not found:
        raise CheckpointError(f"{path}: text_processor/preprocessor_config.json is missing")
    for f in weight_files(path / "text_encoder"):
        read_header(f)
    return {
        "weights": path / "text_encoder",
        "tokenizer": path / "tokenizer",
        "image_processor": found[0],
    }
