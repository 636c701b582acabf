"""LongCat-Image(-Edit) by hand: the MM-DiT transformer, the FLUX.1 VAE, latent packing and position ids,
the flow-matching schedule and sampler, Qwen2.5-VL prompt encoding, and loading of the released checkpoints.

References
- LongCat-Image technical report, arXiv:2512.07584; checkpoints meituan-longcat/LongCat-Image{,-Dev,-Edit}.
- FLUX.1 (black-forest-labs/flux): double/single stream blocks, 3-axis RoPE, 2x2 latent packing, 16-ch VAE.
- Rectified flow (Liu et al. 2022, Esser et al. 2024): x_t = (1 - s) x0 + s eps, the model predicts eps - x0.
Module attributes carry the released (diffusers) tensor names, so a checkpoint loads strictly with no
renaming. Every number here was checked against diffusers' LongCatImageTransformer2DModel, AutoencoderKL and
the LongCatImage(Edit)Pipeline on the same weights (tests/). The spec we follow: shared/SPEC.md.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


class CheckpointError(ValueError):
    """A checkpoint folder that is not what we need; the message says which file or tensor and what to do."""


def _from_json(cls, path: Path):
    """A config dataclass from a diffusers config.json, ignoring its bookkeeping ("_class_name", ...)."""
    raw = json.loads(Path(path).read_text())
    known = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known})


# ----------------------------------------------------------------------------------------------------------
# The transformer


@dataclass
class TransformerConfig:
    """transformer/config.json; defaults are the released LongCat-Image values (not diffusers' FLUX ones)."""

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 10  # joint (double-stream) blocks
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    pooled_projection_dim: int = 3584  # stored in the config, unused by the model
    axes_dims_rope: tuple = (16, 56, 56)  # (modality, row, col); sums to attention_head_dim


def rope(ids: torch.Tensor, axes_dims, theta: float = 10000.0) -> torch.Tensor:
    """Rotations e^(i angle) [S, head_dim / 2] (complex64) for positions ids [S, n_axes], one per pair."""
    # float64 angles keep positions ~1000 exact; MPS has no float64, so it gets float32 there.
    f64 = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=f64, device=ids.device) / d)  # [d/2]
        angles.append(torch.outer(ids[:, i].float(), freqs))  # [S, d/2]
    angles = torch.cat(angles, dim=-1)
    return torch.complex(
        angles.cos().float(), angles.sin().float()
    )  # cos, sin rounded to float32 as diffusers


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), i.e. multiply the pair
    x0 + i x1 by e^(i angle), in float32; x [B, S, H, D]."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, S, H, D/2)
    return torch.view_as_real(pairs * freqs[:, None]).flatten(-2).to(x.dtype)  # (B, S, H, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention, no mask: q, k, v [B, S, H, D] -> [B, S, H*D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )  # (B, H, S, D)
    return out.transpose(1, 2).flatten(2)  # (B, S, H*D)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t [B] (already x1000) as [cos, sin], computed in float32 -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: LayerNorm without affine (eps 1e-6), then x * (1 + scale) + shift per sample."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class Modulation(nn.Module):
    """AdaLN-Zero `norm*.linear`: Linear(SiLU(temb)) split into n (shift, scale, gate, ...) chunks."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.linear.out_features // self.linear.in_features, dim=-1)


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
    """`ff` / `ff_context`: Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D); net.1 is diffusers' dropout slot."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """`attn`: q/k/v projections with per-head RMSNorm; `context=True` adds the text stream's projections."""

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool):
        super().__init__()
        self.heads = heads
        proj, norm = lambda: nn.Linear(dim, heads * head_dim), lambda: nn.RMSNorm(head_dim, eps=1e-6)
        self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k = proj(), proj(), proj(), norm(), norm()
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = proj(), proj(), proj()
            self.norm_added_q, self.norm_added_k = norm(), norm()
            self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])
            self.to_add_out = nn.Linear(heads * head_dim, dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        projs = (self.to_q, self.to_k, self.to_v)
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)) for p in projs)  # (B, S, H, D)
        return self.norm_q(q), self.norm_k(k), v

    def qkv_context(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        projs = (self.add_q_proj, self.add_k_proj, self.add_v_proj)
        q, k, v = (p(c).unflatten(-1, (self.heads, -1)) for p in projs)  # (B, L, H, D)
        return self.norm_added_q(q), self.norm_added_k(k), v


class JointBlock(nn.Module):
    """`transformer_blocks.N`: separate weights for text and image, one attention over [text; image]."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm1_context = Modulation(dim, 6), Modulation(dim, 6)
        self.attn = Attention(dim, heads, head_dim, context=True)
        self.ff, self.ff_context = MLP(dim), MLP(dim)

    def forward(self, img, txt, temb, freqs):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(temb)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        q, k, v = self.attn.qkv(modulate(img, shift1, scale1))
        cq, ck, cv = self.attn.qkv_context(modulate(txt, c_shift1, c_scale1))
        q, k, v = (
            torch.cat([cq, q], dim=1),
            torch.cat([ck, k], dim=1),
            torch.cat([cv, v], dim=1),
        )  # (B, L+N, H, D)
        out = attention(apply_rope(q, freqs), apply_rope(k, freqs), v)
        txt_out, img_out = out.split([txt.shape[1], img.shape[1]], dim=1)
        # gated residuals, rounded as diffusers does (a fused addcmul would differ by an ulp in bf16)
        img = img + gate1[:, None] * self.attn.to_out[0](img_out)
        img = img + gate2[:, None] * self.ff(modulate(img, shift2, scale2))
        txt = txt + c_gate1[:, None] * self.attn.to_add_out(txt_out)
        txt = txt + c_gate2[:, None] * self.ff_context(modulate(txt, c_shift2, c_scale2))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleBlock(nn.Module):
    """`single_transformer_blocks.N`: one stream over [text; image], attention and MLP in parallel."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = Modulation(dim, 3)
        self.attn = Attention(dim, heads, head_dim, context=False)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(dim + 4 * dim, dim)

    def forward(self, x, temb, freqs):
        shift, scale, gate = self.norm(temb)
        h = modulate(x, shift, scale)
        q, k, v = self.attn.qkv(h)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        attn = attention(apply_rope(q, freqs), apply_rope(k, freqs), v)  # (B, S, D)
        x = x + gate[:, None] * self.proj_out(torch.cat([attn, mlp], dim=-1))
        return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


# Selective checkpointing (gradient_checkpointing = "keep_attention"): attention is the costliest op to redo
# in the backward pass while its output is only [B, S, D] per block, so keep it and recompute the rest.
ATTENTION_OPS = [getattr(torch.ops.aten, n).default for n in dir(torch.ops.aten)
                 if n.startswith("_scaled_dot_product") and not n.endswith("backward")]  # fmt: skip


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class LongCatTransformer(nn.Module):
    """The LongCat-Image MM-DiT (root of transformer/*.safetensors)."""

    def __init__(self, config: TransformerConfig | None = None):
        super().__init__()
        c = self.config = config or TransformerConfig()
        heads, head_dim = c.num_attention_heads, c.attention_head_dim
        dim = heads * head_dim
        assert sum(c.axes_dims_rope) == head_dim, f"axes_dims_rope {c.axes_dims_rope} must sum to {head_dim}"
        assert c.patch_size == 1, f"patch_size {c.patch_size}: only 1 exists (2x2 packing happens outside)"
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.time_embed = nn.Module()
        self.time_embed.timestep_embedder = TimestepEmbedder(dim)
        self.transformer_blocks = nn.ModuleList(JointBlock(dim, heads, head_dim) for _ in range(c.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleBlock(dim, heads, head_dim) for _ in range(c.num_single_layers)
        )
        self.norm_out = Modulation(dim, 2)  # chunks are (scale, shift), in that order
        self.proj_out = nn.Linear(dim, c.in_channels)
        self.gradient_checkpointing = False  # or True, or "keep_attention"

    def forward(self, img, txt, sigma, img_ids, txt_ids) -> torch.Tensor:
        """img [B, N, 64], txt [B, L, joint_attention_dim], sigma [B] in [0, 1], img_ids [N, 3],
        txt_ids [L, 3] -> velocity [B, N, 64]."""
        img, txt = self.x_embedder(img), self.context_embedder(txt)
        temb = self.time_embed.timestep_embedder(sigma.to(img.dtype) * 1000, img.dtype)  # (B, D)
        freqs = rope(torch.cat([txt_ids, img_ids]), self.config.axes_dims_rope)  # (L+N, head_dim/2), once
        run = lambda f, *a: f(*a)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            kw = {}
            if self.gradient_checkpointing == "keep_attention":  # recompute all but the attention itself
                kw["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_attention)
            run = lambda f, *a: checkpoint(f, *a, use_reentrant=False, **kw)
        for block in self.transformer_blocks:
            img, txt = run(block, img, txt, temb, freqs)
        x = torch.cat([txt, img], dim=1)  # (B, L+N, D): the single blocks see one stream
        for block in self.single_transformer_blocks:
            x = run(block, x, temb, freqs)
        scale, shift = self.norm_out(temb.to(x.dtype))
        return self.proj_out(modulate(x[:, txt.shape[1] :], shift, scale))


# ----------------------------------------------------------------------------------------------------------
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
    """`resnets.M`: GroupNorm -> SiLU -> conv3x3, twice, plus a 1x1 shortcut when channels change."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
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
        h = self.group_norm(x.flatten(2)).transpose(1, 2)  # (B, HW, C); normed as (B, C, HW) like diffusers
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


class Stage(nn.Module):
    """`down_blocks.N` / `up_blocks.N`: resnets then an optional resampler."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: type | None, key: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, groups) for i in range(n))
        self.key = key
        setattr(self, key, nn.ModuleList([resample(cout)] if resample else []))

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for r in getattr(self, self.key):
            x = r(x)
        return x


class Encoder(nn.Module):
    """`encoder`: image [B, 3, H, W] -> moments [B, 2*latent, H/8, W/8]."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Stage(
                ch[max(i - 1, 0)],
                ch[i],
                c.layers_per_block,
                g,
                Downsample if i < len(ch) - 1 else None,
                "downsamplers",
            )
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """`decoder`: latent [B, latent, h, w] -> image [B, 3, 8h, 8w]."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            Stage(
                ch[max(i - 1, 0)],
                ch[i],
                c.layers_per_block + 1,
                g,
                Upsample if i < len(ch) - 1 else None,
                "upsamplers",
            )
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """The FLUX.1 autoencoder (root of vae/diffusion_pytorch_model.safetensors); images in [-1, 1]."""

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
        """Image [B, 3, H, W] -> the latent distribution's mean [B, 16, H/8, W/8] (raw, not normalised)."""
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
    return (
        vae.encode(x.to(next(vae.parameters()).dtype)) - vae.config.shift_factor
    ) * vae.config.scaling_factor


def from_latent(vae: VAE, z: torch.Tensor) -> torch.Tensor:
    """Normalised latent -> image in [-1, 1] (not clamped)."""
    return vae.decode(
        (z / vae.config.scaling_factor + vae.config.shift_factor).to(next(vae.parameters()).dtype)
    )


def pil_to_tensor(image) -> torch.Tensor:
    """PIL image -> [1, 3, H, W] float32 in [-1, 1] (as diffusers' VaeImageProcessor)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)[None] / 255.0)  # (1, H, W, 3)
    # (1, 3, H, W) viewed, not copied: channels-last in memory like diffusers' tensor, so the VAE's convs pick
    # the same kernels (in bf16 another memory layout rounds differently)
    return (2 * x - 1).permute(0, 3, 1, 2)


def tensor_to_pil(x: torch.Tensor):
    """[1, 3, H, W] in [-1, 1] -> PIL image, rounded as diffusers does."""
    from PIL import Image

    x = (x[0] / 2 + 0.5).clamp(0, 1).float().permute(1, 2, 0).cpu().numpy()  # (H, W, 3), rounded as diffusers
    return Image.fromarray((x * 255).round().astype(np.uint8))


def edit_size(width: int, height: int, area: int = 1024 * 1024) -> tuple[int, int]:
    """The edit pipeline's output size: ~area pixels at the input's aspect ratio, sides rounded up to 16."""
    w = math.sqrt(area * width / height)
    h = w / (width / height)
    up = lambda v: int(v if v % 16 == 0 else (v // 16 + 1) * 16)
    return up(w), up(h)


# ----------------------------------------------------------------------------------------------------------
# Latents, position ids, schedule, sampler


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
    """Positions (modality, L + row, L + col) of an h x w token grid -> [h*w, 3]; 1 target, 2 reference."""
    r = torch.arange(h, device=device, dtype=torch.float64)[:, None].expand(h, w)
    c = torch.arange(w, device=device, dtype=torch.float64)[None, :].expand(h, w)
    return torch.stack([torch.full_like(r, modality), r + text_len, c + text_len], dim=-1).reshape(h * w, 3)


def shift_mu(seq_len: int, sched: dict) -> float:
    """Resolution-dependent shift: linear in the target token count between the scheduler's two anchors."""
    x0, x1 = sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096)
    y0, y1 = sched.get("base_shift", 0.5), sched.get("max_shift", 1.15)
    m = (y1 - y0) / (x1 - x0)
    return seq_len * m + (y0 - m * x0)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """Exponential time shift: logit(sigma') = logit(sigma) + mu."""
    e = torch.tensor(math.exp(mu), dtype=sigma.dtype)  # a tensor: torch's `float / tensor` rounds differently
    return e / (e + (1 / sigma - 1))


def schedule(steps: int, seq_len: int, sched: dict) -> torch.Tensor:
    """sigmas [steps + 1] in float32, from 1 (noise) down to 0, shifted for this many target tokens."""
    sigmas = torch.from_numpy(
        np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    )  # numpy's, as diffusers
    if sched.get("use_dynamic_shifting", True):
        sigmas = time_shift(shift_mu(seq_len, sched), sigmas)
    else:  # a static shift s: sigma' = s sigma / (1 + (s - 1) sigma)
        s = sched.get("shift", 1.0)
        sigmas = s * sigmas / (1 + (s - 1) * sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def initial_noise(
    seed: int, height: int, width: int, dtype: torch.dtype, draw_dtype: torch.dtype | None = None
):
    """The pipelines' starting noise [1, 16, H/8, W/8], drawn on the CPU so a seed means the same everywhere.
    The edit pipeline draws in its own dtype, the t2i pipeline in float32 then casts (draw_dtype)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, 16, height // 8, width // 8), generator=g, dtype=draw_dtype or dtype).to(dtype)


@torch.no_grad()
def sample(
    transformer: LongCatTransformer,
    noise: torch.Tensor,
    txt: torch.Tensor,
    neg_txt: torch.Tensor | None,
    sigmas: torch.Tensor,
    guidance: float = 4.5,
    ref: torch.Tensor | None = None,
    cfg_renorm: bool = False,
    cfg_renorm_min: float = 0.0,
    callback=None,
    progress: bool = True,
) -> torch.Tensor:
    """Euler sampler over the flow: noise [1, 16, h, w] normalised latent -> latent [1, 16, h, w].

    txt / neg_txt [1, L, D] prompt embeddings (neg used when guidance > 1), ref [1, 16, h, w] the clean
    reference latent for editing (its tokens ride along with modality 2; only target tokens are kept).
    callback(i, latent [1, 16, h, w]) is called after each step.
    """
    from tqdm.auto import tqdm

    _, _, h, w = noise.shape
    dev, dtype = noise.device, noise.dtype
    x = pack(noise)  # (1, N, 64)
    n = x.shape[1]
    ref_tokens = pack(ref.to(dtype)) if ref is not None else None
    use_cfg = guidance > 1 and neg_txt is not None

    def ids(L):
        img = image_ids(h // 2, w // 2, L, 1, dev)
        return torch.cat([img, image_ids(h // 2, w // 2, L, 2, dev)]) if ref is not None else img

    conds = [(txt, ids(txt.shape[1]), text_ids(txt.shape[1], dev))]
    if use_cfg:
        conds.append((neg_txt, ids(neg_txt.shape[1]), text_ids(neg_txt.shape[1], dev)))
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress, leave=False):
        # diffusers hands the model (sigma * 1000 in the model dtype) / 1000: match it for bit parity.
        t = ((sigmas[i] * 1000).to(dtype) / 1000).expand(1).to(dev)
        inp = x if ref_tokens is None else torch.cat([x, ref_tokens], dim=1)  # (1, N [+ N], 64)
        v, *v_neg = (transformer(inp, c, t, im, tx)[:, :n] for c, im, tx in conds)
        if use_cfg:
            v_c, v = v, v_neg[0] + guidance * (v - v_neg[0])
            if cfg_renorm:  # rescale each token so the guided velocity is never longer than the conditional
                s = v_c.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + 1e-8)
                v = v * s.clamp(cfg_renorm_min, 1)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]).to(dev) * v).to(v.dtype)  # Euler, in float32
        if callback is not None:
            callback(i, unpack(x, h, w))
    return unpack(x, h, w)


# ----------------------------------------------------------------------------------------------------------
# Prompt encoding with Qwen2.5-VL (SPEC §4)

T2I_PREFIX = (
    "<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on an image "
    "content, suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n"
)
EDIT_PREFIX = (
    "<|im_start|>system\nAs an image editing expert, first analyze the content and attributes of the input "
    "image(s). Then, based on the user's editing instructions, clearly and precisely determine how to modify "
    "the given image(s), ensuring that only the specified parts are altered and all other aspects remain "
    "consistent "
    "with the original(s).<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
MAX_PROMPT_TOKENS = 512
QUOTES = [("'", "'"), ('"', '"'), ("\u2018", "\u2019"), ("\u201c", "\u201d")]


def split_quotes(prompt: str) -> list[tuple[str, bool]]:
    """Split a prompt into (text, quoted) spans; quoted spans keep their quote marks.
    Apostrophes inside words ("don't") are not quotes: they are hidden before splitting, restored after."""
    words = sorted(set(re.findall(r"[a-zA-Z]+'[a-zA-Z]+", prompt)))
    hidden = [(w, "longcat_$##$_longcat" * (i + 1)) for i, w in enumerate(words)]
    for w, mark in sorted(
        hidden, key=lambda p: -len(p[1])
    ):  # longest mark first: marks are prefixes of others
        prompt = prompt.replace(w, mark)
    quoted = "|".join(re.escape(a) + "[^" + re.escape(a + b) + "]*?" + re.escape(b) for a, b in QUOTES)
    spans = []
    for part in re.split(f"({quoted})", prompt):
        for w, mark in sorted(hidden, key=lambda p: -len(p[1])):
            part = part.replace(mark, w)
        if part:
            spans.append((part, re.match(quoted, part) is not None))
    return spans


class TextEncoder:
    """Qwen2.5-VL-7B as LongCat uses it: the chat template around the prompt, the last hidden state kept for
    the prompt's 512 positions (t2i) or for the reference image's tokens and the prompt (edit)."""

    def __init__(self, model, tokenizer, image_processor):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor

    def tokenize(self, prompt: str) -> list[int]:
        """Quoted text goes one character at a time (so the model can spell it), the rest normally; <= 512."""
        tok = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]
        ids = [
            i
            for text, quoted in split_quotes(prompt)
            for i in ([j for ch in text for j in tok(ch)] if quoted else tok(text))
        ]
        return ids[:MAX_PROMPT_TOKENS]

    @torch.no_grad()
    def encode(self, prompt: str, image=None) -> torch.Tensor:
        """Prompt (and, for editing, the reference PIL image at the output size) -> embeddings [1, L, D].
        t2i: L = 512. Edit: the reference goes to Qwen at half size; L = 2 + N_vl + 512."""
        tok = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]
        ids = self.tokenize(prompt)
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = (
            ids + [pad] * (MAX_PROMPT_TOKENS - len(ids)),
            [1] * len(ids) + [0] * (MAX_PROMPT_TOKENS - len(ids)),
        )
        extra = {}
        if image is None:
            prefix = tok(T2I_PREFIX)
            start = len(prefix)
        else:
            from PIL import Image

            half = image.convert("RGB").resize((image.width // 2, image.height // 2), Image.LANCZOS)
            vl = self.image_processor(images=half, return_tensors="pt")
            n_vl = int(vl["image_grid_thw"].prod()) // self.image_processor.merge_size**2
            prefix = tok(EDIT_PREFIX.replace("<|image_pad|>", "<|image_pad|>" * n_vl))
            start = prefix.index(self.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
            extra = {"pixel_values": vl["pixel_values"], "image_grid_thw": vl["image_grid_thw"]}
        suffix = tok(SUFFIX)
        dev = next(self.model.parameters()).device
        input_ids = torch.tensor([prefix + prompt_ids + suffix], device=dev)
        mask = torch.tensor([[1] * len(prefix) + prompt_mask + [1] * len(suffix)], device=dev)
        extra = {k: v.to(dev) for k, v in extra.items()}
        if "pixel_values" in extra:
            extra["pixel_values"] = extra["pixel_values"].to(next(self.model.parameters()).dtype)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, **extra
        ).last_hidden_state  # after the final norm
        return out[:, start : -len(suffix)]


# ----------------------------------------------------------------------------------------------------------
# Loading the released checkpoints (a local folder or a hub id)

PIPELINES = {"LongCatImageEditPipeline": "edit", "LongCatImagePipeline": "t2i"}
NEEDED = ["model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json",
          "text_encoder/config.json", "tokenizer"]  # fmt: skip


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local checkpoint folder as is, or a hub id downloaded (or found in the cache) via huggingface_hub.
    HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE=1 are honoured by huggingface_hub itself."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~")):
            raise CheckpointError(
                f"{name_or_path}: no such folder (and not a hub id like meituan-longcat/LongCat-Image-Edit)"
            )
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(name_or_path)))
        except (
            Exception
        ) as e:  # network, auth, offline without a cached copy: all end the same way for a user
            raise CheckpointError(
                f"{name_or_path}: not downloadable nor in the Hugging Face cache ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); pass a local folder with --model or set HF_HOME"
            ) from None
    for need in NEEDED:
        if not (path / need).exists():
            raise CheckpointError(f"{path} is not a LongCat-Image checkpoint: {need} is missing")
    return path


def read_flavour(path: Path) -> str:
    """'edit' or 't2i', from model_index.json's pipeline class."""
    name = json.loads((Path(path) / "model_index.json").read_text()).get("_class_name")
    if name not in PIPELINES:
        raise CheckpointError(
            f"{path}/model_index.json: _class_name {name!r} is not one of {sorted(PIPELINES)}"
        )
    return PIPELINES[name]


def read_scheduler(path: Path) -> dict:
    return json.loads((Path(path) / "scheduler/scheduler_config.json").read_text())


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component: those of the shard index if there is one, else the one file."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    missing = [f for f in files if not f.exists()]
    if not files or missing:
        raise CheckpointError(
            f"{folder}: {missing[0].name if missing else 'no *.safetensors file'} is missing"
        )
    return files


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
    "U8": torch.uint8,
}  # fmt: skip


def read_header(file: Path) -> dict:
    """A safetensors file's table {name: {dtype, shape, data_offsets}}: an 8-byte length, then JSON."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    for info in header.values():
        info["data_offsets"] = [o + 8 + n for o in info["data_offsets"]]  # absolute positions in the file
    return header


def read_tensor(fh, info: dict, staging: torch.Tensor) -> torch.Tensor:
    """One tensor by a plain read (no mmap: only what we keep counts as resident) into a reusable staging
    buffer: a weight quantized on arrival then leaves no freed hole of its size behind."""
    start, end = info["data_offsets"]
    fh.seek(start)
    fh.readinto(memoryview(staging.numpy())[: end - start])
    return staging[: end - start].view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def trim_heap() -> None:
    """Hand freed heap pages back to the OS. Quantizing while loading frees a float temporary per weight
    between the int8 codes we keep; glibc would hold those holes as resident memory (~0.4x the model)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows): nothing to do
        pass


def load_weights(model: nn.Module, folder: Path, dtype: torch.dtype, device, convert=None) -> nn.Module:
    """Fill a meta-device model from a folder of safetensors, strictly (every name and shape must match),
    one tensor at a time so peak memory stays at the model's size. `convert(model)` may swap modules first
    (quantization): their `_load_from_state_dict` then sees each float tensor as it arrives."""
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    seen = {name: (info, f) for f in weight_files(folder) for name, info in read_header(f).items()}
    for name, shape in expected.items():
        if name not in seen:
            raise CheckpointError(f"{folder}: tensor {name} {shape} is missing from the checkpoint")
        if seen[name][0]["shape"] != shape:
            got = seen[name][0]["shape"]
            raise CheckpointError(f"{seen[name][1]}: tensor {name} has shape {got}, expected {shape}")
    if extra := sorted(set(seen) - set(expected)):
        raise CheckpointError(
            f"{seen[extra[0]][1]}: unexpected tensor {extra[0]} (a different model or config?)"
        )
    if convert is not None:
        convert(model)
    size = max(i["data_offsets"][1] - i["data_offsets"][0] for i, _ in seen.values())
    staging = torch.empty(size, dtype=torch.uint8)
    for f in weight_files(folder):
        with open(f, "rb") as fh:
            for name, info in read_header(f).items():
                t = read_tensor(fh, info, staging).to(device)
                t = t.to(dtype) if t.is_floating_point() else t
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                module.load_state_dict({leaf: t}, strict=False, assign=True)
                kept = getattr(module, leaf)
                if (
                    kept is not None
                    and kept.untyped_storage().data_ptr() == staging.untyped_storage().data_ptr()
                ):
                    module.load_state_dict({leaf: t.clone()}, strict=False, assign=True)  # its own copy
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    assert not left, f"not loaded: {left[:3]}"
    return model.eval().requires_grad_(False)


def load_transformer(path: Path, dtype=torch.bfloat16, device="cpu", convert=None) -> LongCatTransformer:
    config = _from_json(TransformerConfig, Path(path) / "transformer/config.json")
    with torch.device("meta"):
        model = LongCatTransformer(config)
    return load_weights(model, Path(path) / "transformer", dtype, device, convert)


def load_vae(path: Path, dtype=torch.float32, device="cpu") -> VAE:
    config = _from_json(VAEConfig, Path(path) / "vae/config.json")
    with torch.device("meta"):
        model = VAE(config)
    return load_weights(model, Path(path) / "vae", dtype, device)


def load_text_encoder(path: Path, dtype=torch.bfloat16, device="cpu", convert=None) -> TextEncoder:
    """Qwen2.5-VL from text_encoder/ (transformers maps legacy and new tensor names) without its LM head (only
    the hidden states are used), its tokenizer (right padding, as the pipelines assume) and image processor
    (the PIL backend: no torchvision needed). `convert(model)` (quantization) runs on the CPU first."""
    import transformers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    tokenizer.padding_side = "right"
    proc_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    dirs = [
        d
        for d in ("text_processor", "tokenizer", "text_encoder")
        if (path / d / "preprocessor_config.json").exists()
    ]
    if not dirs:
        raise CheckpointError(f"{path}: text_processor/preprocessor_config.json is missing")
    where = "cpu" if convert is not None else str(device)
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path / "text_encoder", dtype=dtype, device_map=where
    )
    backbone = full.model  # (1 GB of lm_head in the released model is never used)
    del full
    if convert is not None:
        convert(backbone)
        backbone.to(device)
    return TextEncoder(
        backbone.eval().requires_grad_(False), tokenizer, proc_cls.from_pretrained(path / dirs[0])
    )


# ----------------------------------------------------------------------------------------------------------
# A tiny random checkpoint in the released layout: for tests and for trying minicat without 30 GB of weights

TINY_TRANSFORMER = TransformerConfig(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    axes_dims_rope=(8, 12, 12),
)
TINY_VAE = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
SPECIAL_TOKENS = "<|endoftext|> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|vision_pad|> "
SPECIAL_TOKENS += "<|image_pad|> <|video_pad|>"
TINY_FILES = json.loads("""{
  "scheduler/scheduler_config.json": {"_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": true, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
  "text_processor/preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
    "resample": 3, "do_rescale": true, "rescale_factor": 0.00392156862745098, "do_normalize": true,
    "do_convert_rgb": true,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
  "model_index.json": {"_diffusers_version": "0.36.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"], "tokenizer": ["transformers",
    "Qwen2Tokenizer"], "text_processor": ["transformers", "Qwen2VLProcessor"], "transformer": ["diffusers",
    "LongCatImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
  "qwen_text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "tie_word_embeddings": false},
  "qwen_vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
    "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 112, "fullatt_block_indexes": [1]}
}""")


def _tiny_tokenizer():
    """A byte-level BPE like Qwen2's (400 tokens) trained on the templates: words merge, quotes don't."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet, special = pre_tokenizers.ByteLevel.alphabet(), SPECIAL_TOKENS.split()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(
        [T2I_PREFIX, EDIT_PREFIX, SUFFIX, "make the sky blue, add a red hat"] * 3, trainer
    )
    return Qwen2Tokenizer(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token=None
    )


def write_tiny_checkpoint(folder: str | Path, flavour: str = "edit", seed: int = 0) -> Path:
    """Write a random LongCat checkpoint with tiny configs in the released folder layout (sharded transformer,
    Qwen2.5-VL text encoder, byte-level tokenizer, image processor, scheduler). Deterministic for a seed."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _tiny_tokenizer()
        tid = tokenizer.convert_tokens_to_ids
        text = {**TINY_FILES["qwen_text"], "vocab_size": len(tokenizer)}
        qwen = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=TINY_FILES["qwen_vision"],
            image_token_id=tid("<|image_pad|>"),
            video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"),
            vision_end_token_id=tid("<|vision_end|>"),
            bos_token_id=tid("<|endoftext|>"),
            eos_token_id=tid("<|im_end|>"),
            **text,
        )
        Qwen2_5_VLForConditionalGeneration(qwen).save_pretrained(folder / "text_encoder")
        transformer, vae = LongCatTransformer(TINY_TRANSFORMER), VAE(TINY_VAE)
    tokenizer.save_pretrained(folder / "tokenizer")
    tokenizer.save_pretrained(folder / "text_processor")
    pipeline = {"edit": "LongCatImageEditPipeline", "t2i": "LongCatImagePipeline"}[flavour]
    files = {**TINY_FILES, "model_index.json": {"_class_name": pipeline, **TINY_FILES["model_index.json"]}}
    files["tokenizer/preprocessor_config.json"] = files["text_processor/preprocessor_config.json"]
    for name, content in files.items():
        if name.endswith(".json"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(content, indent=2))
    blocks = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    save_component(
        folder / "vae", vae.state_dict(), {"_class_name": "AutoencoderKL", **asdict(TINY_VAE), **blocks}
    )
    tr_cfg = {"_class_name": "LongCatImageTransformer2DModel", **asdict(TINY_TRANSFORMER)}
    save_component(folder / "transformer", transformer.state_dict(), tr_cfg, shards=2)
    return folder


def save_component(folder: Path, state: dict, config: dict, shards: int = 1) -> None:
    """config.json + diffusion_pytorch_model*.safetensors, sharded with an index json as diffusers does."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}, indent=2)
    )
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if shards == 1:
        return save_file(
            state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"}
        )
    names, weight_map = list(state), {}
    for i in range(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
        "weight_map": weight_map,
    }
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
