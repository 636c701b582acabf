"""Fitting a frozen base into less GPU memory: int8 / fp8 weights quantized while the checkpoint
loads, and fp8 compute.

LoRA training never updates the base weights, so they can be stored in 8 bits and expanded to the
compute dtype one layer at a time, right before the matmul (weight-only quantization; LLM.int8()
without the outlier path, and gpt-fast's `WeightOnlyInt8Linear`). Symmetric, per output row o:

    int8: s_o = max_i |W_oi| / 127,  q_oi = clamp(round(W_oi / s_o), -127, 127)
    fp8:  s_o = max_i |W_oi| / 448,  q_oi = e4m3(W_oi / s_o)      (448: the largest e4m3 value)
    y = x @ (q * s)^T + b      (q * s made in x's dtype, so the GEMM keeps its fused bias)

One scale per output channel makes each row use the full code range; int8 then has a rounding error
of at most s_o / 2 per element, e4m3 a relative error of at most 2^-4 (3 mantissa bits) for normal
values. The bias is kept as it came (gpt-fast drops it, which LongCat's biased projections cannot
afford).

Memory. A dequantized copy exists only transiently inside one layer. A plain
`F.linear(x, q.to(dtype))` would make autograd save that copy for the backward pass, a bf16 copy of
every weight across a training step; `_QuantLinearFn` saves the int8/fp8 tensor instead and
dequantizes again in backward. Only the gradient w.r.t. the input is computed: the weight is a
buffer and never trains.

Streaming. `quantize_model` works on a model built on the `meta` device; each `QuantLinear` then
quantizes a float `weight` the moment it arrives through `load_state_dict(..., assign=True)` (see
`QuantLinear._load_from_state_dict`), on the tensor's own device, so the float checkpoint never
sits in memory in full. Already quantized `weight` + `scale` pairs (our own `state_dict()`) load
unchanged.

Hooks for lora.py (duck typed, no import): `QuantLinear.dequantize() -> Tensor` returns the float32
weight and `QuantLinear.load_float_weight(w)` re-quantizes a float weight into the layer; LoRA
merging is `load_float_weight(dequantize() + scale * B @ A)`.

fp8 compute ("fp8-compute": fp8 weights, on fp8 tensor cores: Ada, Hopper): the activations are
also rounded to e4m3, with one float32 scale per token (quantize_activations), and
`torch._scaled_mm` multiplies the codes: y = (x_q @ q^T) s_x s_w + b in the compute dtype. The input
gradient is computed from the expanded weight (gradients stay bf16). check_device runs one such
matmul on the GPU before a run relies on it.

Mode names: "int8", "fp8", "fp8-compute", "none"; SimpleTuner's "int8-quanto", "fp8-torchao" and
"no_change" are aliases.
References: Dettmers et al. 2022, LLM.int8() (arXiv:2208.07339); Micikevicius et al. 2022, FP8
formats for deep learning (arXiv:2209.05433); pytorch-labs/gpt-fast quantize.py; karpathy/nanochat
fp8.py; torch._scaled_mm with row-wise scales as torchao's float8 training uses it.
"""

import re

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "fp8", "fp8-compute", "none")
ALIASES = {"int8-quanto": "int8", "fp8-torchao": "fp8", "no_change": "none"}
QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}  # the largest code: int8's symmetric range, e4m3's largest
DEFAULT_TARGETS = (r"^(single_)?transformer_blocks\.",)  # the block linears, 99% of the parameters
# Qwen2.5-VL's decoder layers (attention and MLP linears: 7B of 8.3B parameters), either naming.
TEXT_ENCODER_TARGETS = (r"layers\.\d+\.(self_attn|mlp)\.",)


def normalize_mode(name: str, compute: bool = True) -> str:
    """Canonical mode name ("int8", "fp8", "fp8-compute", "none") for a mode or one of its aliases.
    compute=False refuses fp8-compute (the text encoder runs no backward and gains nothing)."""
    mode = ALIASES.get(name, name)
    if mode not in MODES or (mode == "fp8-compute" and not compute):
        choices = ", ".join(m for m in [*MODES, *ALIASES] if compute or m != "fp8-compute")
        raise ValueError(f"unknown quantization mode {name!r}; choose one of: {choices}")
    return mode


@torch.no_grad()
def quantize_weight(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): per-output-row symmetric quantization of a float (out, in) weight, on w's
    device. The float32 work is done 16M elements at a time, so its temporary never exceeds 64 MB
    however large the weight (the loader's peak memory stays near the quantized size)."""
    absmax = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).float()  # (out,): exact, no copy of w
    scale = torch.where(absmax > 0, absmax / QMAX[mode], 1.0)  # an all-zero row stays 0
    codes = torch.empty(w.shape, dtype=QDTYPE[mode], device=w.device)
    step = max(1, (1 << 24) // max(1, w.shape[1]))  # rows per block
    for i in range(0, w.shape[0], step):
        block = w[i : i + step].to(torch.float32, copy=True)  # (rows, in)
        block.div_(scale[i : i + step, None])
        block = block.round_().clamp_(-127, 127) if mode == "int8" else block.clamp_(-448, 448)
        codes[i : i + step] = block.to(codes.dtype)  # the fp8 cast rounds to nearest
    return codes, scale


def _dequantized(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (out, in) x scale (out,) in the compute dtype, made once per call, dropped after it."""
    return weight.to(dtype).mul_(scale.to(dtype)[:, None])


class _QuantLinearFn(torch.autograd.Function):
    """y = x @ (q * scale)^T + bias, the weight expanded in the compute dtype so the matmul keeps
    its fused bias (one pass over the weight, none over the larger output); backward expands it
    again instead of saving a float copy."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        # Expand straight into the dtype the matmul runs in: under autocast an fp32 x would
        # otherwise get an fp32 copy of the weight and then autocast's bf16 copy of that.
        auto = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if auto else x.dtype
        ctx.save_for_backward(weight, scale)
        ctx.has_bias = bias is not None
        return F.linear(
            x.to(dtype),
            _dequantized(weight, scale, dtype),
            None if bias is None else bias.to(dtype),
        )

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_out @ _dequantized(weight, scale, grad_out.dtype)  # (..., in)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of activations x (tokens, in) for fp8 compute: e4m3 codes (tokens, in) and one
    float32 scale per token (tokens, 1), x ~ codes * scale. The codes are x times 448 / amax made in
    x's dtype, that factor capped at the dtype's largest value (a zero token: codes 0, not 0 / 0);
    the scale is the float32 reciprocal of the factor used. A scale amax / 448 kept in float16 would
    be coarse for amax below 0.027 and 0 below 1.4e-5 (a zero token gave 0 / 0 = NaN codes)."""
    amax = x.abs().amax(dim=1, keepdim=True).float()  # (tokens, 1), exact
    factor = (QMAX["fp8"] / amax).clamp(max=torch.finfo(x.dtype).max)  # 448 / 0 = inf: capped
    factor = factor.to(x.dtype)  # applied in x's dtype: no float32 copy of x
    codes = (x * factor).clamp_(-QMAX["fp8"], QMAX["fp8"]).to(torch.float8_e4m3fn)
    return codes, 1 / factor.float()


class _Fp8MatmulFn(torch.autograd.Function):
    """fp8 compute: y = (x_q @ q^T) * s_x s_w + bias on fp8 tensor cores (torch._scaled_mm).
    Activations get one e4m3 scale per token (quantize_activations), the weight keeps its
    per-channel scale; the input gradient is computed in the compute dtype from the expanded weight
    (gradients are not quantized)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        dtype, shape = x.dtype, x.shape
        xq, sx = quantize_activations(x.reshape(-1, shape[-1]))  # (tokens, in), (tokens, 1) float32
        b = None if bias is None else bias.to(dtype)
        sw = scale[None].float()  # (1, out)
        y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=sw, bias=b, out_dtype=dtype)
        ctx.save_for_backward(weight, scale)
        ctx.has_bias = bias is not None
        return y.reshape(*shape[:-1], -1)

    backward = staticmethod(_QuantLinearFn.backward)


class QuantLinear(nn.Module):
    """Frozen Linear: int8 / fp8 `weight` buffer (out, in), float32 `scale` buffer (out,), bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "int8",
        device=None,
    ):
        super().__init__()
        mode = normalize_mode(mode)
        assert mode != "none", "QuantLinear needs int8, fp8 or fp8-compute"
        # fp8-compute stores fp8 codes like fp8 and multiplies them in fp8 (see _Fp8MatmulFn)
        self.in_features = in_features
        self.out_features = out_features
        self.compute = mode == "fp8-compute"
        self.mode = "fp8" if self.compute else mode
        # Buffers, not Parameters: frozen for free, yet in state_dict() and moved by .to(device).
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=QDTYPE[self.mode], device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        b = torch.zeros(out_features, device=device)
        self.register_parameter("bias", nn.Parameter(b, requires_grad=False) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, mode: str) -> "QuantLinear":
        """Quantize an nn.Linear; on the meta device, only empty buffers for the loader to fill."""
        w, b = linear.weight, linear.bias
        q = cls(
            linear.in_features, linear.out_features, bias=b is not None, mode=mode, device=w.device
        )
        if b is not None:
            q.bias = nn.Parameter(b.detach(), requires_grad=False)  # keeps the bias's own dtype
        if not w.is_meta:
            q.load_float_weight(w)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp8_matmul = self.compute and x.dtype in (torch.bfloat16, torch.float16)
        fn = _Fp8MatmulFn if fp8_matmul else _QuantLinearFn
        return fn.apply(x, self.weight, self.scale, self.bias)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) that the codes and scales represent."""
        return self.weight.float() * self.scale[:, None]

    def load_float_weight(self, w: torch.Tensor) -> None:
        """Quantize a float weight (out, in) into this layer, on w's device."""
        assert w.shape == (self.out_features, self.in_features), (tuple(w.shape), self)
        self.weight, self.scale = quantize_weight(w, self.mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The loader hands us checkpoint tensors one at a time (weight and bias in separate calls):
        # a float weight is quantized here, on its device, so only its int8/fp8 form outlives this
        # call. A weight already in our code dtype (our own state_dict) is taken as it is, together
        # with its scale.
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != self.weight.dtype:
            if not w.is_floating_point():
                raise ValueError(
                    f"{prefix}weight: cannot load a {w.dtype} tensor into a {self.mode} QuantLinear"
                )
            codes, scale = quantize_weight(w, self.mode)
            state_dict[prefix + "weight"] = codes
            state_dict[prefix + "scale"] = scale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor, and e4m3 counts as floating: cast the codes
        # back (exact: every e4m3 value is representable in bf16/fp16/fp32), the weight stays 8-bit.
        super()._apply(fn, recurse)
        if self.weight is not None and self.weight.dtype != QDTYPE[self.mode]:  # None: offloaded
            self.weight = self.weight.to(QDTYPE[self.mode])
        return self

    def extra_repr(self) -> str:
        mode = "fp8-compute" if self.compute else self.mode
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={mode}"


def quantize_model(
    model: nn.Module, mode: str, targets: list[str] | tuple[str, ...] | None = None
) -> int:
    """Replace every nn.Linear whose dotted name matches a `targets` regex (re.search) with a
    QuantLinear; returns how many. Works on real weights and on a meta-device model still waiting
    for its checkpoint."""
    mode = normalize_mode(mode)
    if mode == "none":
        return 0
    patterns = [re.compile(t) for t in (DEFAULT_TARGETS if targets is None else targets)]
    chosen = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(p.search(name) for p in patterns)
    ]
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, QuantLinear.from_linear(getattr(owner, leaf), mode))
    return len(chosen)


def fp8_matmul_error(device) -> str | None:
    """The first line of the error that one real fp8-compute matmul raises on `device`, or None if
    it runs: torch._scaled_mm with a scale per token and one per channel, as every fp8-compute layer
    calls it. A compute capability does not tell whether this torch build has that kernel."""
    probe = QuantLinear(64, 32, mode="fp8-compute", device=device)
    x = torch.ones(16, 64, device=device, dtype=torch.bfloat16)
    try:
        probe(x).sum().item()  # .item() waits for the kernel, so a failure surfaces here
    except (RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    return None


def check_device(mode: str, device) -> None:
    """A one-line ValueError if `device` cannot run `mode`. fp8-compute needs a CUDA GPU on which
    one real fp8 matmul runs: fp8 tensor cores (Ada, Hopper, newer) and a torch with the kernel."""
    if mode != "fp8-compute":
        return
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"fp8-compute needs a CUDA GPU with fp8 tensor cores, not {device.type}; use fp8"
        )
    if error := fp8_matmul_error(device):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"fp8-compute does not run on {name} with torch {torch.__version__} ({error}); use fp8"
        )


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
