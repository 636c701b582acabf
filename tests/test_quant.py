"""quant.py: int8 / fp8 weight-only linears, error bounds, autograd, streaming load, fp8 compute.
CPU, a few seconds.

Run: python -m pytest tests/test_quant.py
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyBlock
from torch import nn

import quant
from lora import inject_lora, mark_only_lora_as_trainable, merge
from quant import (
    QuantLinear,
    normalize_mode,
    quantize_activations,
    quantize_model,
    quantize_weight,
    weight_bytes,
)


class Toy(nn.Module):
    def __init__(self, d: int = 32, c: int = 16):
        super().__init__()
        self.x_embedder, self.proj_out = nn.Linear(c, d), nn.Linear(d, c)
        self.transformer_blocks = nn.ModuleList([ToyBlock(d), ToyBlock(d)])
        self.single_transformer_blocks = nn.ModuleList([ToyBlock(d)])

    def forward(self, x):
        x = self.x_embedder(x)
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            x = block(x)
        return self.proj_out(x)


def linear(out_f=48, in_f=64, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight[3] = 0  # an all-zero row must not divide by zero
        lin.weight[5, 7] = 4.0  # an outlier sets its row's scale
    return lin


def test_int8_error_at_most_half_a_step_per_row():
    w = linear().weight.detach()
    q, scale = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs().amax(dim=1)
    assert (err <= scale / 2 + 1e-6).all(), (err - scale / 2).max()
    assert (q[3] == 0).all() and torch.isfinite(scale).all()


def test_fp8_error_within_e4m3_rounding():
    w = linear().weight.detach()
    q, scale = quantize_weight(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    err = (q.float() * scale[:, None] - w).abs()
    # 3 mantissa bits: relative error <= 2^-4 for normal codes (|w / s| >= 2^-6); subnormal codes
    # are spaced 2^-9 apart, so their absolute error is <= 2^-10 * s.
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10) * (1 + 1e-5)
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_forward_equals_linear_with_dequantized_weight(mode):
    lin = linear()
    q = QuantLinear.from_linear(copy.deepcopy(lin), mode)
    x = torch.randn(2, 5, 64)
    ref = F.linear(x, q.dequantize(), lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_input_grad_equals_dequantized_linear_and_saves_no_float_weight(mode):
    q = QuantLinear.from_linear(linear(), mode)
    ref = nn.Linear(64, 48)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
        ref.bias.copy_(q.bias)
    x1 = torch.randn(3, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y1 = q(x1)
    g = torch.randn_like(y1)
    y1.backward(g)
    ref(x2).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    dtypes = [t.dtype for t in saved]
    assert all(t.dtype == q.weight.dtype or t.numel() <= 48 for t in saved), dtypes
    assert q.weight.grad is None and not q.bias.requires_grad


def test_lora_on_int8_base_trains():
    torch.manual_seed(0)
    model = Toy()
    quantize_model(model, "int8")
    inject_lora(model, rank=4, alpha=4)
    mark_only_lora_as_trainable(model)
    model(torch.randn(2, 7, 16)).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 12 and all(".lora_" in n for n in grads), sorted(grads)
    assert all(g is not None for g in grads.values())
    # B starts at zero, so at the first step only B gets a nonzero gradient (A's is exactly zero)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(torch.equal(g, torch.zeros_like(g)) for n, g in grads.items() if "lora_A" in n)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_meta_build_then_streamed_load_equals_quantizing_loaded_model(mode):
    torch.manual_seed(0)
    dense = Toy()
    with torch.device("meta"):
        streamed = Toy()
    assert quantize_model(streamed, mode) == 12
    for (
        name,
        tensor,
    ) in dense.state_dict().items():  # one checkpoint tensor at a time, as the loader does
        owner, _, leaf = name.rpartition(".")
        streamed.get_submodule(owner).load_state_dict(
            {leaf: tensor.clone()}, strict=False, assign=True
        )
    direct = copy.deepcopy(dense)
    assert quantize_model(direct, mode) == 12
    assert not any(t.is_meta for t in [*streamed.parameters(), *streamed.buffers()])
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(streamed(x), direct(x), rtol=0, atol=0)
    # our own quantized state dict reloads as it is
    again = copy.deepcopy(streamed)
    again.load_state_dict(direct.state_dict(), strict=True, assign=True)
    assert torch.equal(again(x), direct(x))


def test_default_targets_are_the_block_linears_only():
    model = Toy()
    assert quantize_model(model, "int8-quanto") == 12
    assert type(model.x_embedder) is nn.Linear and type(model.proj_out) is nn.Linear
    assert isinstance(model.single_transformer_blocks[0].ff.net[2], QuantLinear)
    assert quantize_model(Toy(), "int8", targets=[r"attn\.to_q$"]) == 3
    assert quantize_model(Toy(), "none") == 0


def test_bias_keeps_its_own_dtype():
    """QuantLinear makes a float32 bias slot; a bfloat16 layer's bias must stay bfloat16 (and
    equal), whether quantized in place or streamed into a meta-built layer."""
    lin = linear().to(torch.bfloat16)
    q = QuantLinear.from_linear(copy.deepcopy(lin), "int8")
    assert q.bias.dtype == torch.bfloat16 and torch.equal(q.bias, lin.bias)
    assert q.scale.dtype == torch.float32
    with torch.device("meta"):
        streamed = QuantLinear.from_linear(nn.Linear(64, 48), "int8")
    for name, tensor in lin.state_dict().items():  # one tensor at a time, as the loader does
        streamed.load_state_dict({name: tensor}, strict=False, assign=True)
    assert streamed.bias.dtype == torch.bfloat16 and torch.equal(streamed.bias, lin.bias)
    assert torch.equal(streamed.weight, q.weight) and torch.equal(streamed.scale, q.scale)


def test_int8_weight_bytes_about_half_of_bf16():
    model = Toy(d=256)
    bf16 = weight_bytes(copy.deepcopy(model).to(torch.bfloat16))
    quantize_model(model, "int8")
    blocks = [model.transformer_blocks, model.single_transformer_blocks]
    quantized_part = sum(weight_bytes(b) for b in blocks)
    dense = Toy(d=256).named_parameters()
    dense_part = sum(p.numel() * 2 for n, p in dense if "transformer_blocks" in n)
    ratio = quantized_part / dense_part  # int8 weight + float32 scale and bias per row, vs bf16
    assert 0.5 < ratio < 0.53, ratio
    assert weight_bytes(model) < 0.6 * bf16


def test_to_dtype_keeps_fp8_codes():
    q = QuantLinear.from_linear(linear(), "fp8")
    codes = q.weight.clone()
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.float8_e4m3fn and torch.equal(q.weight.float(), codes.float())


def test_lora_merge_into_int8_equals_dequant_add_requant():
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.to_q = QuantLinear.from_linear(linear(), "int8")
    inject_lora(model, rank=4, alpha=8, targets=["attn.to_q"])
    layer = model.attn.to_q
    nn.init.normal_(layer.lora_B.weight)
    expected = QuantLinear.from_linear(linear(), "int8")
    with torch.no_grad():  # scale = alpha / rank = 2
        expected.load_float_weight(
            expected.dequantize() + 2.0 * (layer.lora_B.weight @ layer.lora_A.weight)
        )
    merge(model)
    assert torch.equal(layer.base.weight, expected.weight) and torch.equal(
        layer.base.scale, expected.scale
    )


def test_mode_aliases_and_unknown_names():
    assert [normalize_mode(m) for m in ("int8-quanto", "fp8-torchao", "no_change")] == [
        "int8",
        "fp8",
        "none",
    ]
    with pytest.raises(ValueError, match="'int4'"):
        normalize_mode("int4")
    with pytest.raises(ValueError, match="'nf4'"):
        quantize_model(Toy(), "nf4")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def activations(dtype: torch.dtype) -> torch.Tensor:
    """(6, 128) tokens of very different sizes: a zero token, one whose amax / 448 is 0 in float16
    (1e-5), and larger ones up to 300."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 128, generator=g, dtype=torch.float64)
    x *= torch.tensor([0.0, 1e-5, 1e-2, 1.0, 3.0, 100.0], dtype=torch.float64)[:, None]
    x[5, 7] = 300.0  # an outlier sets its token's scale
    return x.to(dtype)


ROUNDING = {torch.bfloat16: 2**-8, torch.float16: 2**-11}  # half a unit in the last place, relative


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_activation_codes_follow_the_per_token_formula(dtype):
    """x ~ codes * scale, one float32 scale per token: s = amax / 448 (computed here in float64),
    each token's largest code near 448, a zero token all zeros with a finite scale (not 0 / 0)."""
    x = activations(dtype)
    codes, scale = quantize_activations(x)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (6, 1)
    assert torch.isfinite(scale).all() and (scale > 0).all(), scale.flatten()
    assert (codes[0].float() == 0).all()
    x64 = x.double()
    amax = x64.abs().amax(dim=1)  # (6,)
    # the factor 448 / amax is made in x's dtype: rounded (so s is within one rounding), and capped
    # at the dtype's largest value (float16: for amax < 448 / 65504 the scale is 1 / 65504)
    capped = 448 / amax > torch.finfo(dtype).max
    s = amax / 448
    rel_s = (scale[:, 0].double() - s).abs() / s
    assert (rel_s[~capped] <= ROUNDING[dtype]).all(), rel_s
    assert (scale[capped, 0] == 1 / torch.finfo(dtype).max).all(), scale[capped]
    top = codes.float().abs().amax(dim=1)[~capped]
    assert (top >= 416).all() and (top <= 448).all(), top  # e4m3's values near 448: 416, 448
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal codes (plus x * factor rounded
    # in x's dtype first), absolute <= 2^-10 * scale for subnormal ones
    err = (codes.double() * scale.double() - x64).abs()
    bound = torch.maximum(x64.abs() * (2**-4 + 2 * ROUNDING[dtype]), scale.double() * 2**-10)
    assert (err <= bound * (1 + 1e-6)).all(), (err - bound).max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_compute_equals_the_float64_product_of_its_codes(dtype):
    """The layer's output against its matmul written out in float64 on the same codes and scales,
    y = (codes_x s_x) (codes_w s_w)^T + b with b in x's dtype: _scaled_mm sums in float32 and rounds
    to x's dtype (the product, then with the bias: two roundings at most). A zero token gives b."""
    lin = linear(64, 128)
    layer = QuantLinear.from_linear(lin, "fp8-compute")
    x = activations(dtype)
    y = layer(x[None])[0]  # (6, 64)
    assert y.dtype == dtype and torch.isfinite(y).all()
    codes, sx = quantize_activations(x)
    x_dequantized = codes.double() * sx.double()  # (6, 128)
    w_dequantized = layer.weight.double() * layer.scale.double()[:, None]  # (64, 128)
    product = x_dequantized @ w_dequantized.T  # (6, 64)
    want = product + lin.bias.detach().to(dtype).double()
    err = (y.double() - want).abs()
    bound = (want.abs() + product.abs()) * ROUNDING[dtype] + 1e-6 * want.abs().amax()
    assert (err <= bound).all(), (err - bound).max()
    assert torch.equal(y[0], lin.bias.detach().to(dtype)), y[0]


def test_fp8_compute_stays_within_activation_rounding_of_fp8_weights():
    """Against the exact float product fp8-compute is off by 6 % at most (e4m3 rounds each of x and
    w by up to 2^-4, about 2.5 % rms each); the input gradient is the weight-only one exactly
    (gradients are not quantized)."""
    lin = linear(64, 128)
    weight_only = QuantLinear.from_linear(lin, "fp8")
    compute = QuantLinear.from_linear(lin, "fp8-compute")
    assert compute.compute and compute.mode == "fp8"
    assert torch.equal(compute.weight.float(), weight_only.weight.float())
    x = torch.randn(3, 40, 128, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y_weight_only = weight_only(x1)
    y_compute = compute(x2)
    exact = F.linear(x.float(), lin.weight, lin.bias)
    assert y_compute.dtype == torch.bfloat16 and y_compute.shape == (3, 40, 64)
    assert rel(y_compute, y_weight_only) < 0.05, rel(y_compute, y_weight_only)
    assert rel(y_compute, exact) < 0.06, rel(y_compute, exact)
    g = torch.randn_like(y_compute)
    y_weight_only.backward(g)
    y_compute.backward(g)
    assert torch.equal(x1.grad, x2.grad)


def test_fp8_compute_is_refused_off_cuda_in_one_line():
    quant.check_device("int8", "cpu")  # weight-only modes run anywhere
    message = "^fp8-compute needs a CUDA GPU with fp8 tensor cores, not cpu; use fp8$"
    with pytest.raises(ValueError, match=message):
        quant.check_device("fp8-compute", "cpu")


def test_the_fp8_probe_runs_a_real_matmul_and_names_its_error(monkeypatch):
    """The device check multiplies for real (the CPU's _scaled_mm runs); a failing call is reported
    by its first line, as on a GPU without fp8 tensor cores or a torch without a row-wise kernel."""
    assert quant.fp8_matmul_error("cpu") is None
    calls = []
    why = "torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0"

    def fails(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError(why + "\nand more")

    monkeypatch.setattr(torch, "_scaled_mm", fails)
    assert quant.fp8_matmul_error("cpu") == f"RuntimeError: {why}"
    assert calls[0]["scale_a"].shape == (16, 1)  # one scale per token
    assert calls[0]["scale_b"].shape == (1, 32)  # one per output channel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_compute_runs_on_hopper_and_is_refused_before_ada():
    capability = torch.cuda.get_device_capability()
    if capability >= (9, 0):
        quant.check_device("fp8-compute", "cuda")
    elif capability < (8, 9):
        with pytest.raises(ValueError, match=r"^fp8-compute does not run on .*; use fp8$"):
            quant.check_device("fp8-compute", "cuda")


def test_fp8_compute_is_refused_for_the_text_encoder_and_named_in_errors():
    assert normalize_mode("fp8-compute") == "fp8-compute"
    with pytest.raises(
        ValueError, match="unknown quantization mode 'fp8-compute'; choose one of: int8, fp8, none"
    ):
        normalize_mode("fp8-compute", compute=False)
