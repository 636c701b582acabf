"""Speed and memory of minicat's LoRA training and inference against diffusers + peft; memory plans.

    python bench.py --released [--res 768,1024] [--compile] [--peak-tflops 989] [--json out.json]
    python bench.py --released --small [--json out.json]    the same code narrowed: ~1.5 min on a CPU
    python bench.py [--plan] [--small] [--json out.json]    the released model's memory plans, anywhere

--released measures on the device at hand (cuda if any) what the H200 tables in README's Performance
section measure: the released-size transformer (D = 3072, 10 + 20 blocks, 6.27 B parameters), seeded
random weights made on the device in bf16, one configuration at a time (built, measured, deleted,
memory emptied, peak stats reset: a "peak" is max_memory_allocated() of that configuration alone,
weights included). First diffusers' LongCatImageTransformer2DModel holding minicat's state_dict,
with peft's LoRA; then minicat with a bf16, int8, fp8 and fp8-compute base (skipped, with the
reason, without fp8 tensor cores or if torch._scaled_mm fails) and an int8 base streaming 4/5 of its
blocks from CPU memory (LongCatTransformer.offload_blocks). Each trains a rank-16 LoRA on
lora.DEFAULT_TARGETS (float32, the same values on both sides, B small, not zero) with gradient
checkpointing, plain and (minicat, not offloaded) checkpoint_keep_attention: minicat as train.py
does (bf16 base and activations, no autocast), diffusers + peft under bf16 autocast. Step = forward,
float32 MSE, backward, AdamW; medians of --steps after --warmup, synchronized. First losses must
match diffusers' (bf16 2 %, 8-bit 10 %) or the run stops. Inference: a bf16 no-grad forward,
adapters off (validate.py merges them). Inputs: edit_inputs(res): res² target + res² reference +
(514 + Qwen's tokens of the half-size reference) text tokens, batch 1. Attention:
set_attention_backend("auto"), never cuDNN attention where a backward runs (that backward crashed on
an H200); diffusers trains under enable_cudnn_sdp(False), alike. MFU = (2 x forward linear + 3.5 x
forward attention FLOPs) / step time / peak, linear = 2 * 12 D² * S * blocks, attention = 4 * S² * D
* blocks (S = all tokens), peak = --peak-tflops or PEAK_TFLOPS. --compile: minicat's
compile_blocks(), diffusers' compile_repeated_blocks(), not the offloaded model. --small: D 256, 1 +
2 blocks, 256² edits, few steps (on a GPU: a smoke test of the CUDA path); on a CPU still bf16
(emulated: slow, but the GPU's code path), process CPU time on one thread, peak = model + AdamW
bytes + PeakMemory of a step, MFU against a nominal 1 TFLOP/s. The released size on a CPU is
refused.

--plan (the default): the released transformer's training memory (4) and validate.py's (6), batch 1,
in bytes as max_memory_allocated counts them (nvidia-smi adds the CUDA context and ~0.5-1 GB of
slack), weight bytes exact (meta device), activations of released-size modules on fake tensors
(FakeTensorMode) at the true lengths, bf16 without autocast as train.py runs. Projected = weights +
LoRA with fp32 grads and AdamW states + the 30 checkpointed block inputs + one incoming gradient +
the largest in-block peak (a block's forward + backward: its recomputation) + the final layer; a
whole-model fake run checks it. The text encoder's activations (6) are analytic.
"""

import argparse
import gc
import json
import math
import re
import statistics
import time
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lora
import model as M
import pipeline
import quant

# decimal GB, as the released model card's "6.3 GB" figures
GB, BF16, CPU = 1e9, torch.bfloat16, torch.device("cpu")
RELEASED = M.TransformerConfig()
D = RELEASED.num_attention_heads * RELEASED.attention_head_dim
SIZES = {
    "released": dict(cfg=RELEASED, res=(768, 1024), warmup=3, steps=5, offload=24),
    "small": dict(
        cfg=replace(RELEASED, num_attention_heads=2, num_layers=1, num_single_layers=2), res=(256,)
    ),
}
SIZES["small"].update(warmup=1, steps=3, offload=2)
# Dense bf16 tensor-core peaks (fp32 accumulate), TFLOP/s, by a word of
# torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H100 PCIe": 756,
    "H100": 989,
    "H200": 989,
    "GH200": 989,
    "H800": 989,
    "B200": 2250,
    "A100": 312,
    "L40S": 362,
    "L4": 121,
    "RTX 4090": 165,
}
# The printed columns: {heading: (field of a measurement, decimals)}; a ratio is minicat / diffusers
# + peft.
TRAIN_COLS = {
    "step s": ("step_s", 3),
    "peak GB": ("peak_gb", 3),
    "MFU": ("mfu", 3),
    "s ratio": ("step_s_ratio", 3),
    "GB ratio": ("peak_gb_ratio", 3),
    "1st loss": ("first_loss", 4),
}
INFER_COLS = {
    "forward s": ("forward_s", 4),
    "peak GB": ("peak_gb", 3),
    "TFLOP/s": ("tflops", 3),
    "s ratio": ("forward_s_ratio", 3),
    "|diff|": ("max_abs_diff", 4),
}
QWEN_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)
QWEN_7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584
)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class PeakMemory(TorchDispatchMode):
    """CPU stand-in for max_memory_allocated: bytes of the storages ops create inside the `with`
    (outputs that alias no input), each counted until it is freed; `.peak` is the high-water mark.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            s = t.untyped_storage()
            # views and in-place ops make no new bytes
            if s._cdata not in inputs and s._cdata not in self.seen:
                self.seen.add(s._cdata)
                self.live += s.nbytes()
                # storages die with their last user
                weakref.finalize(s, self._free, s._cdata, s.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_bytes(fn) -> int:
    """Peak bytes that fn() allocates on the CPU above what existed before it."""
    with PeakMemory() as pm:
        fn()
    return pm.peak


def table(
    title: str, cols: list[str], rows: dict, width: int = 11, first: int = 46, digits=None
) -> None:
    """Rows {name: values}: a float printed with digits[column] (default 3) decimals, anything
    else as -."""
    print(f"\n## {title}\n{'':{first}}" + "".join(f"{c:>{width}}" for c in cols))
    for name, values in rows.items():
        cells = [
            f"{v:{width}.{d}f}" if isinstance(v, float) else f"{'-':>{width}}"
            for v, d in zip(values, digits or [3] * len(cols), strict=True)
        ]
        print(f"{name:{first}}" + "".join(cells))


def edit_lengths(res: int) -> tuple[int, int]:
    """(image tokens = target + reference, text tokens = 514 + Qwen's tokens of the half-size
    reference)."""
    return 2 * (res // 16) ** 2, 514 + round(res / 2 / 28) ** 2


def edit_inputs(res: int, device, dtype=BF16) -> list[torch.Tensor]:
    """A res² edit as train.py feeds it: img [1, 2N, 64] (target; reference), txt [1, L, 3584],
    sigma [1] in dtype (the model's), img_ids [2N, 3], txt_ids [L, 3], target [1, N, 64] in float32.
    """
    (n, L), g, grid = edit_lengths(res), torch.Generator().manual_seed(0), res // 16
    img, txt = (
        torch.randn(1, n, 64, generator=g).to(dtype),
        torch.randn(1, L, 3584, generator=g).to(dtype),
    )
    ids = torch.cat([M.image_ids(grid, grid, L, 1), M.image_ids(grid, grid, L, 2)])
    sigma = torch.tensor([0.7], dtype=dtype)
    target = torch.randn(1, n // 2, 64, generator=g)
    return [t.to(device) for t in (img, txt, sigma, ids, M.text_ids(L), target)]


def in_bf16(build):
    """build() with bf16 as the default dtype (fake parameters cannot be swapped by a later
    .to(dtype))."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(BF16)
    try:
        return build()
    finally:
        torch.set_default_dtype(default)


def released(mode: str, rank: int = 0, cfg: M.TransformerConfig = RELEASED) -> torch.nn.Module:
    """The transformer in bf16 on the active device or fake mode, frozen, `mode` base, fp32 LoRA
    if rank."""
    m = in_bf16(partial(M.LongCatTransformer, cfg)).requires_grad_(False)
    quant.quantize_model(m, mode)
    if rank:
        lora.inject_lora(m, rank, rank)
        lora.mark_only_lora_as_trainable(m)
    return m


# --------------------------------------------------------------------------------------------------
# --released: measured, one configuration at a time


@dataclass(frozen=True)
class Setup:
    """One configuration: minicat with a quant.py `mode` base ("none" = bf16), or diffusers + peft."""

    key: str
    label: str
    mode: str = "none"
    diffusers: bool = False
    offload: bool = False

    def variants(self) -> list[tuple[str, bool]]:
        """(training key, checkpoint_keep_attention) of each training measurement."""
        plain = [(self.key, False)]
        return (
            plain
            if self.diffusers or self.offload
            else plain + [(f"{self.key}_keep_attention", True)]
        )


SETUPS = (
    Setup("diffusers_bf16", "diffusers+peft bf16", diffusers=True),
    Setup("minicat_bf16", "minicat bf16"),
    Setup("minicat_int8", "minicat int8", "int8"),
    Setup("minicat_fp8", "minicat fp8", "fp8"),
    Setup("minicat_fp8_compute", "minicat fp8-compute", "fp8-compute"),
    Setup("minicat_int8_offload", "minicat int8, offload", "int8", offload=True),
)


def peak_flops(name: str | None, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s for MFU, where the figure comes from) for a GPU's name (None: a CPU)."""
    if override:
        return override, "--peak-tflops"
    if name is None:
        return 1.0, "nominal: a CPU has no meaningful bf16 peak"
    for gpu in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"\b{gpu}\b", name):
            return float(PEAK_TFLOPS[gpu]), f"{gpu}, dense bf16"
    return 989.0, f"{name} is not in PEAK_TFLOPS: 989 (H100 / H200) assumed, set --peak-tflops"


@contextmanager
def no_cudnn_sdp(active: bool = True):
    """torch's cuDNN SDPA off inside (diffusers' training steps: that backward crashed on an H200)."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(was and not active)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def set_lora(model: torch.nn.Module) -> list[str]:
    """The same float32 LoRA values on minicat and peft (whose `…lora_A.default.weight` is lora.py's
    `…lora_A.weight`), drawn in name order from one seeded generator: A (r, in) uniform in
    ±1/sqrt(in) as peft's Kaiming init, B (out, r) N(0, 0.01²) so the LoRA path shows in the loss.
    Returns the names."""
    g = torch.Generator().manual_seed(0)
    params = {k.replace(".default.", "."): p for k, p in model.named_parameters() if "lora_" in k}
    assert all(p.dtype == torch.float32 for p in params.values()), (
        "the LoRA tensors are not float32"
    )
    for name in sorted(params):
        p = params[name]
        # in place: a compiled model keeps its tensors
        with torch.no_grad():
            if ".lora_A." in name:
                p.copy_((2 * torch.rand(p.shape, generator=g) - 1) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    return sorted(params)


def build_minicat(size: dict, setup: Setup, device) -> torch.nn.Module:
    """Random bf16 weights (seeded: every build has the same), `setup.mode` base, a rank-16 LoRA,
    and the first size["offload"] blocks offloaded when the setup asks for it: built by
    pipeline.build_transformer, as train.py builds it."""

    def add_lora(m: torch.nn.Module) -> None:
        lora.inject_lora(m, 16, 16)
        lora.mark_only_lora_as_trainable(m)

    torch.manual_seed(0)
    return pipeline.build_transformer(
        size["cfg"],
        torch.device(device),
        BF16,
        quant_mode=setup.mode,
        adapt=add_lora,
        offload_blocks=size["offload"] if setup.offload else 0,
    )


def build_diffusers(cfg: M.TransformerConfig, device) -> torch.nn.Module:
    """diffusers' model holding build_minicat's bf16 weights (the same seed; the very tensors of
    minicat's state_dict, assigned), with peft's rank-16 float32 LoRA on the same 12 targets."""
    from diffusers import LongCatImageTransformer2DModel, training_utils
    from peft import LoraConfig

    torch.manual_seed(0)
    with torch.device(device):
        weights = released("none", 0, cfg).state_dict()
    with torch.device("meta"):
        theirs = LongCatImageTransformer2DModel(
            **{**asdict(cfg), "axes_dims_rope": list(cfg.axes_dims_rope)}
        )
        # only for its LoRA names
        ours = released("none", 16, cfg)
    theirs.load_state_dict(weights, strict=True, assign=True)
    config = LoraConfig(r=16, lora_alpha=16, target_modules=list(lora.DEFAULT_TARGETS))
    theirs.requires_grad_(False).add_adapter(config)
    # peft's adapters come in the base's bf16: float32, as diffusers' training scripts make them
    lora.mark_only_lora_as_trainable(theirs)
    training_utils.cast_training_params(theirs, torch.float32)
    names, expected = set_lora(theirs), sorted(k for k in ours.state_dict() if "lora_" in k)
    assert names == expected, (
        f"peft adapted {len(names) // 2} modules, lora.py {len(expected) // 2}"
    )
    return theirs


def fp8_compute_problem(device) -> str | None:
    """Why an fp8-compute base cannot run here (one real torch._scaled_mm fails), or None. Unlike
    train.py and validate.py, which refuse fp8-compute off CUDA, the bench runs it wherever the
    kernel runs, so a CPU run still goes through its code."""
    return quant.fp8_matmul_error(torch.device(device))


def forward(model: torch.nn.Module, inputs: list) -> torch.Tensor:
    """The velocity [1, 2N, 64] (target; reference tokens) of minicat's or diffusers' model."""
    img, txt, sigma, ids, tids, _ = inputs
    if isinstance(model, M.LongCatTransformer):
        return model(img, txt, sigma, ids, tids)
    kw = dict(
        encoder_hidden_states=txt, timestep=sigma, img_ids=ids, txt_ids=tids, return_dict=False
    )
    return model(img, **kw)[0]


def resident_bytes(model: torch.nn.Module, opt=None) -> int:
    """Bytes the model's tensors and the optimizer's states hold (the CPU's memory_allocated)."""
    states = [
        t for s in (opt.state.values() if opt else []) for t in s.values() if torch.is_tensor(t)
    ]
    return quant.weight_bytes(model) + sum(t.nbytes for t in states)


def measure(fn, warmup: int, steps: int, device, resident) -> tuple[float, int]:
    """(median seconds of `steps` calls of fn after `warmup` others, peak bytes). CUDA: wall time
    between synchronizes, max_memory_allocated over the timed calls (all that is on the GPU). CPU:
    process time (one thread), resident() + what one more call allocates (PeakMemory)."""
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(clock() - t0)
    if cuda:
        return statistics.median(times), torch.cuda.max_memory_allocated(device)
    before = resident()
    return statistics.median(times), before + peak_bytes(fn)


def infer(model: torch.nn.Module, inputs: list, size: dict, device) -> tuple[dict, torch.Tensor]:
    """A bf16 no-grad forward, adapters off: ({forward_s, peak_gb}, the output [1, 2N, 64] on the
    CPU)."""
    ours = isinstance(model, M.LongCatTransformer)
    lora.set_lora_scale(model, 0.0) if ours else model.disable_adapters()
    with torch.no_grad():
        pred = forward(model.eval(), inputs).float().cpu()
        run = partial(forward, model, inputs)
        s, peak = measure(
            run, size["warmup"] - 1, size["steps"], device, partial(resident_bytes, model)
        )
    lora.set_lora_scale(model, 1.0) if ours else model.enable_adapters()
    return {"forward_s": s, "peak_gb": peak / GB}, pred


def train(model: torch.nn.Module, inputs: list, keep_attention: bool, size: dict, device) -> dict:
    """Checkpointed LoRA training from the same start each time (set_lora, a fresh AdamW):
    {first_loss, step_s, peak_gb}. minicat in bf16 without autocast; diffusers under bf16 autocast,
    cuDNN SDPA off."""
    theirs = not isinstance(model, M.LongCatTransformer)
    target = inputs[-1]
    if theirs:
        model.enable_gradient_checkpointing()
    else:
        model.gradient_checkpointing, model.checkpoint_keep_attention = True, keep_attention
    set_lora(model.train())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(first: bool = False) -> float | None:
        with no_cudnn_sdp(theirs):
            with torch.autocast(device.type, BF16, enabled=theirs):
                pred = forward(model, inputs)
            loss = F.mse_loss(pred[:, : target.shape[1]].float(), target)
            loss.backward()
        if first:
            missing = sum(p.grad is None for p in params)
            assert not missing, f"{missing} of {len(params)} LoRA tensors got no gradient"
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item() if first else None

    first = step(first=True)
    s, peak = measure(
        step, size["warmup"] - 1, size["steps"], device, partial(resident_bytes, model, opt)
    )
    return {"first_loss": first, "step_s": s, "peak_gb": peak / GB}


def run_setup(setup: Setup, size: dict, args, rel: dict, preds: dict) -> None:
    """Build one configuration and measure its inference and training at each edit size into rel;
    stop the run when a first loss is off diffusers' (the same weights, adapters and inputs)."""
    device = args.device
    model = (
        build_diffusers(size["cfg"], device)
        if setup.diffusers
        else build_minicat(size, setup, device)
    )
    rel["weights_gb"][setup.key] = resident_bytes(model) / GB
    if args.compile:
        model.compile_repeated_blocks() if setup.diffusers else model.compile_blocks()
    for res in size["res"]:
        result = rel["res"][str(res)]
        inputs = edit_inputs(res, device)
        result["infer"][setup.key], preds[res][setup.key] = infer(model, inputs, size, device)
        ref = result["train"]["diffusers_bf16"]
        for key, keep in setup.variants():
            result["train"][key] = entry = train(model, inputs, keep, size, device)
            print(f"  {res}² {key}: {entry}", flush=True)
            tol = 0.02 if setup.mode == "none" else 0.1
            if ref and not abs(entry["first_loss"] - ref["first_loss"]) <= tol * abs(
                ref["first_loss"]
            ):
                why = f"{entry['first_loss']:.6f} vs diffusers' {ref['first_loss']:.6f}: the run stops"
                raise SystemExit(f"error: the first loss of {key} at {res}² is {why}")


def run_or_record(setup: Setup, size: dict, args, rel: dict, preds: dict) -> None:
    """run_setup, or the reason it is skipped (fp8-compute without fp8 support) or failed (recorded,
    the run goes on, the exit status says so; a first-loss mismatch's SystemExit stops it); then
    free what it left (left_gb: what is still allocated, ~0, so the next configuration is alone on
    the device)."""
    reason = fp8_compute_problem(args.device) if setup.mode == "fp8-compute" else None
    print(f"{setup.label}: {f'skipped ({reason})' if reason else 'building'}", flush=True)
    if reason:
        rel["skipped"][setup.key] = reason
        return
    try:
        run_setup(setup, size, args, rel, preds)
    except Exception as e:
        traceback.print_exc()
        rel["failed"][setup.key] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    finally:
        gc.collect()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(args.device)
            rel["left_gb"][setup.key] = torch.cuda.memory_allocated(args.device) / GB


def derive(rel: dict, size: dict, preds: dict) -> None:
    """TFLOP/s, MFU, ratios to diffusers + peft and forward differences, from the measurements."""
    for res in size["res"]:
        r = rel["res"][str(res)]
        # forward FLOPs of the blocks' linears (12 D² weights per token per block) and of their
        # attention
        S, cfg = r["tokens"]["total"], size["cfg"]
        d, blocks = (
            cfg.num_attention_heads * cfg.attention_head_dim,
            cfg.num_layers + cfg.num_single_layers,
        )
        linear = 2 * 12 * d**2 * S * blocks / 1e12
        attention = 4 * S**2 * d * blocks / 1e12
        # a training step: forward + input gradients of the linears, attention forward (1) +
        # backward (2.5)
        flops = r["model_tflop"] = {
            "train": 2 * linear + 3.5 * attention,
            "infer": linear + attention,
        }
        for kind, field in (("train", "step_s"), ("infer", "forward_s")):
            ref = r[kind]["diffusers_bf16"]
            for entry in filter(None, r[kind].values()):
                entry["tflops"] = flops[kind] / entry[field]
                entry["mfu"] = entry["tflops"] / rel["peak_tflops"]
                for f in (field, "peak_gb"):
                    entry[f"{f}_ratio"] = entry[f] / ref[f] if ref else None
        # the forward's largest difference from diffusers' output (whose largest |value| is
        # output_max_abs)
        theirs = preds[res].get("diffusers_bf16")
        r["output_max_abs"] = None if theirs is None else theirs.abs().max().item()
        for key, entry in r["infer"].items():
            if entry and theirs is not None:
                entry["max_abs_diff"] = (preds[res][key] - theirs).abs().max().item()


def released_bench(args, out: dict) -> None:
    """--released: every configuration of SETUPS in turn, alone on the device; results in
    out["released"]."""
    size = {**SIZES["small" if args.small else "released"]}
    size.update({k: getattr(args, k) for k in ("res", "warmup", "steps") if getattr(args, k)})
    cfg, device, preds = size["cfg"], args.device, {r: {} for r in size["res"]}
    with torch.device("meta"):
        n = sum(p.numel() for p in released("none", 0, cfg).parameters())
    rel = out["released"] = dict(
        model={**asdict(cfg), "parameters": n}, dtype="bfloat16", compile=args.compile
    )
    rel.update(warmup=size["warmup"], steps=size["steps"], offload_blocks=size["offload"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    rel["peak_tflops"], rel["peak_tflops_source"] = peak_flops(gpu, args.peak_tflops)
    rel.update(device=gpu or "cpu", skipped={}, failed={}, weights_gb={}, left_gb={}, res={})
    for r in size["res"]:
        n, L = edit_lengths(r)
        tokens = {"target": n // 2, "reference": n // 2, "text": L, "total": n + L}
        # None until measured: stays None for a skipped or failed configuration
        train = dict.fromkeys(k for setup in SETUPS for k, _ in setup.variants())
        rel["res"][str(r)] = {
            "tokens": tokens,
            "train": train,
            "infer": dict.fromkeys(s.key for s in SETUPS),
        }
    print_header(rel, device.type == "cuda")
    M.set_attention_backend("auto")
    threads = torch.get_num_threads()
    torch.set_num_threads(threads if device.type == "cuda" else 1)
    try:
        for setup in SETUPS:
            run_or_record(setup, size, args, rel, preds)
    finally:
        torch.set_num_threads(threads)
    derive(rel, size, preds)
    for res in size["res"]:
        print_tables(rel, res)
    for key, why in [*rel["skipped"].items(), *rel["failed"].items()]:
        print(f"{key}: {'FAILED' if key in rel['failed'] else 'skipped'} ({why})")


def print_header(rel: dict, cuda: bool) -> None:
    m = rel["model"]
    d, blocks = (
        m["num_attention_heads"] * m["attention_head_dim"],
        m["num_layers"] + m["num_single_layers"],
    )
    clock = "wall time, synchronized" if cuda else "process CPU time, one thread"
    memory = "max_memory_allocated" if cuda else "model + AdamW bytes + PeakMemory of a step"
    lines = [
        f"\n## --released on {rel['device']}: D = {d}, {blocks} blocks, {m['parameters'] / 1e9:.2f} B "
        f"parameters, random weights, bf16"
        + ("" if cuda else " (emulated on a CPU: slow, the GPU code path)"),
        'attention: minicat set_attention_backend("auto"), no cuDNN attention where a backward runs; '
        "diffusers + peft trains under torch.backends.cuda.enable_cudnn_sdp(False), as its cuDNN "
        "attention backward crashes on an H200; inference: torch's default kernels for both",
        f"timing: median of {rel['steps']} after {rel['warmup']} warm-up, {clock}; peak: {memory}; "
        f"MFU against {rel['peak_tflops']:.0f} TFLOP/s ({rel['peak_tflops_source']})",
    ]
    print("\n".join(lines))


def print_tables(rel: dict, res: int) -> None:
    """The training and the inference table at one edit size."""
    r = rel["res"][str(res)]
    train_rows = {}
    infer_rows = {}
    blocks = rel["model"]["num_layers"] + rel["model"]["num_single_layers"]
    for setup in SETUPS:
        label = setup.label + (f" {rel['offload_blocks']}/{blocks}" if setup.offload else "")
        for key, keep in setup.variants():
            row = [(r["train"][key] or {}).get(field) for field, _ in TRAIN_COLS.values()]
            train_rows[label + (", keep_attention" if keep else "")] = row
        infer_rows[label] = [
            (r["infer"][setup.key] or {}).get(field) for field, _ in INFER_COLS.values()
        ]
    t = r["tokens"]
    tokens = f"{t['target']} + {t['reference']} + {t['text']} = {t['total']} tokens"
    edit = f"{res}² edit ({tokens}, batch 1)"
    title = f"training step, {edit}: LoRA r16 on 12 targets, checkpointing, AdamW"
    title += "; ratio = / diffusers + peft"
    table(title, list(TRAIN_COLS), train_rows, 10, 44, [d for _, d in TRAIN_COLS.values()])
    title = f"inference forward, {edit}, bf16, no grad"
    title += f"; |diff| = max vs diffusers' ({r['output_max_abs']})"
    table(title, list(INFER_COLS), infer_rows, 10, 44, [d for _, d in INFER_COLS.values()])


# --------------------------------------------------------------------------------------------------
# --plan (sections 4 and 6): the released model's memory plan (meta device for bytes, fake tensors for
# activations), bf16 activations without autocast as train.py trains


def block_peaks(res: int, mode: str) -> dict:
    """Peak bytes of forward + backward of one released joint block, one single block (LoRA, no
    checkpointing: what a checkpointed block needs when recomputed), and the final layer + loss."""
    n, L = edit_lengths(res)
    with FakeTensorMode():
        m = released(mode, 16, replace(RELEASED, num_layers=1, num_single_layers=1))
        # temb [1, D]; cos, sin [S, head_dim] float32, as model.rope makes them
        temb, cos, sin = (
            torch.randn(1, D, dtype=BF16),
            torch.randn(n + L, 128),
            torch.randn(n + L, 128),
        )
        img, txt, x = (torch.randn(1, s, D, dtype=BF16, requires_grad=True) for s in (n, L, n + L))
        g_img, g_txt, g_x = (torch.randn(1, s, D, dtype=BF16) for s in (n, L, n + L))
        joint = m.transformer_blocks[0]
        single = m.single_transformer_blocks[0]

        def final() -> None:
            # the target tokens [1, N/2, D] -> [1, N/2, 64]; norm_out's chunks are (scale, shift)
            scale, shift = m.norm_out(temb)
            pred = m.proj_out(M.modulate(x[:, L : L + n // 2], shift, scale))
            F.mse_loss(pred.float(), torch.randn(1, n // 2, 64)).backward()

        runs = {
            "joint": lambda: torch.autograd.backward(
                joint(img, txt, temb, cos, sin), [g_img, g_txt]
            ),
            "single": lambda: single(x, temb, cos, sin).backward(g_x),
            "final": final,
        }
        return {k: peak_bytes(f) for k, f in runs.items()}


def whole_model_peak(res: int, mode: str, train: bool) -> int:
    """Peak bytes above the weights of the released model on fake tensors: a checkpointed LoRA
    training step as train.py runs it (bf16 inputs, no autocast), or (train=False) a bf16 no-grad
    forward (validate.py)."""
    with FakeTensorMode():
        m = released(mode, 16 if train else 0)
        m.gradient_checkpointing = True
        img, txt, sigma, ids, tids, target = edit_inputs(res, CPU)

        def run():
            with torch.set_grad_enabled(train):
                pred = m(img, txt, sigma, ids, tids)
            if train:
                F.mse_loss(pred[:, : target.shape[1]].float(), target).backward()

        return peak_bytes(run)


def project_training(res: int, mode: str, check: bool = False) -> dict:
    """Bytes of each part of a LoRA training step at a res² edit (batch 1, checkpointing, cached
    inputs)."""
    n, L = edit_lengths(res)
    with torch.device("meta"):
        m = released(mode, 16)
    n_lora, peaks = (
        sum(p.numel() for k, p in m.named_parameters() if "lora_" in k),
        block_peaks(res, mode),
    )
    blocks = RELEASED.num_layers + RELEASED.num_single_layers
    parts = {
        "weights (exact)": quant.weight_bytes(m) - 4 * n_lora,
        "LoRA + grads + AdamW states, fp32 (exact)": 16 * n_lora,
        f"saved inputs of the {blocks} blocks, bf16 (exact)": blocks * (n + L) * D * 2,
        "incoming block gradient (exact)": (n + L) * D * 2,
        "largest in-block peak (fake)": max(peaks["joint"], peaks["single"]),
        "final layer + loss (fake)": peaks["final"],
    }
    parts["total (projected)"] = sum(parts.values())
    if check:
        # weights and AdamW states outside, LoRA grads inside the measured peak
        fake = whole_model_peak(res, mode, True)
        parts["whole model on fake tensors (check)"] = quant.weight_bytes(m) + 8 * n_lora + fake
    return parts


def validate_plan(out: dict) -> None:
    """validate.py's stages for a 1 MP edit (1024² output) with bf16 or int8 weights, in GB."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # exact text encoder bytes, from the real module tree
    with torch.device("meta"):
        config = Qwen2_5_VLConfig(text_config=QWEN_7B, vision_config=QWEN_7B_VISION)
        te = Qwen2_5_VLForConditionalGeneration(config)
        vae_w = quant.weight_bytes(M.VAE().to(BF16))
    total = sum(p.numel() for p in te.parameters())
    assert total == 8_292_166_656, f"Qwen2.5-VL-7B has 8,292,166,656 parameters, not {total:,}"
    # validate.load_text_encoder keeps the backbone: lm_head is never used
    te = te.model.to(BF16)
    te_w = {"bf16": quant.weight_bytes(te)}
    quant.quantize_model(te, "int8", targets=quant.TEXT_ENCODER_TARGETS)
    te_w["int8"] = quant.weight_bytes(te)
    n, L = edit_lengths(1024)
    # ~75 system-prompt tokens before <|vision_start|>, 5 after
    T, h = L + 80, QWEN_7B["hidden_size"]
    te_act = (QWEN_7B["num_hidden_layers"] + 1) * T * h * 2 + 3 * T * QWEN_7B[
        "intermediate_size"
    ] * 2
    with FakeTensorMode(), torch.no_grad():
        vae = in_bf16(M.VAE)
        # a 1024² image's latent [1, 16, 128, 128]
        decode = peak_bytes(lambda: vae.decode(torch.randn(1, 16, 128, 128, dtype=BF16)))
    cols = {}
    for name, mode in (("bf16", "none"), ("int8", "int8")):
        with torch.device("meta"):
            tr_w = quant.weight_bytes(released(mode))
        s = cols[name] = {
            "1 text encoder weights (exact, no lm_head)": te_w[name],
            "  + activations (analytic: 29 hidden states, MLP)": te_act,
            "2 transformer + VAE weights (exact; VAE stays)": tr_w + vae_w,
            "  + forward activations (fake) + embeddings": whole_model_peak(1024, mode, False)
            + 4 * L * h,
            "3 VAE weights + decode at 1024² (fake)": vae_w + decode,
        }
        v = list(s.values())
        s["peak = largest stage (projected)"] = max(v[0] + v[1], v[2] + v[3], v[4])
        out[f"projected_peak_gb_validate_1mp_{name}"] = s["peak = largest stage (projected)"] / GB
    title = (
        f"6. validate.py plan, GB: 1 MP edit ({n // 2}+{n // 2}+{L} tokens), batch 1, one stage at a "
        "time; Qwen2.5-VL-7B text encoder without lm_head, int8 = its language model's Linears"
    )
    table(title, list(cols), {k: [c[k] / GB for c in cols.values()] for k in cols["bf16"]}, 10, 52)


def memory_plan(small: bool, out: dict) -> None:
    """Section 4: the training plan at several edit sizes and bases; the whole-model fake check (~15
    s on a CPU each) on every column, or with --small on 768² int8 only."""
    cols = [(512, "int8"), (768, "int8"), (1024, "int8"), (768, "bf16"), (1024, "bf16")]
    cols += [] if small else [(768, "fp8"), (1024, "fp8")]
    jobs = [(r, m.replace("bf16", "none"), not small or (r, m) == (768, "int8")) for r, m in cols]
    plans = [project_training(*job) for job in jobs]
    names = dict.fromkeys(k for p in plans for k in p)
    rows = {k: [p[k] / GB if k in p else None for p in plans] for k in names}
    title = (
        "4. training plan, GB: released transformer, LoRA r16 (12 targets), batch 1, "
        "checkpointing, bf16 base and activations (no autocast), cached inputs; (fake) = measured "
        "on fake tensors at true lengths"
    )
    table(title, [f"{r}² {m}" for r, m in cols], rows)
    for (r, m), p in zip(cols, plans, strict=True):
        out[f"projected_peak_gb_edit_{r}_{m}"] = p["total (projected)"] / GB
        if "whole model on fake tensors (check)" in p:
            out[f"fake_whole_model_peak_gb_edit_{r}_{m}"] = (
                p["whole model on fake tensors (check)"] / GB
            )
    print(
        f"target 768² int8 <= 10 GB: {out['projected_peak_gb_edit_768_int8']:.2f} GB (+ CUDA context)"
    )
    with torch.device("meta"):
        weights = {mode: quant.weight_bytes(released(mode)) for mode in ("none", "int8", "fp8")}
    out["int8_weight_bytes_ratio"] = weights["int8"] / weights["none"]
    out["fp8_weight_bytes_ratio"] = weights["fp8"] / weights["none"]


def parse_args(argv) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=summary, epilog=details, formatter_class=formatter)
    p.add_argument("--released", action="store_true", help="measure minicat vs diffusers + peft")
    p.add_argument(
        "--plan", action="store_true", help="the memory plans (the default without --released)"
    )
    p.add_argument("--small", action="store_true", help="narrow sizes: minutes on a CPU")
    p.add_argument("--res", help="--released edit sizes, multiples of 16 (768,1024; --small: 256)")
    p.add_argument(
        "--warmup", type=int, help="--released warm-up steps, the first-loss step one of them"
    )
    p.add_argument("--steps", type=int, help="--released timed steps of each measurement")
    p.add_argument("--compile", action="store_true", help="--released: torch.compile the blocks")
    p.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s, for MFU")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="--released"
    )
    p.add_argument("--json", type=Path, help="write every number to this file")
    args = p.parse_args(argv)
    args.device, args.plan = torch.device(args.device), args.plan or not args.released
    if args.released and args.device.type != "cuda" and not args.small:
        p.error(
            "--released at the released size (6.27 B parameters) needs a GPU; on a CPU add --small"
        )
    res = (args.res or "16").split(",")
    if not all(r.isdigit() and int(r) > 0 and int(r) % 16 == 0 for r in res):
        p.error(f"--res {args.res}: edit sizes are positive multiples of 16, e.g. 768,1024")
    args.res = tuple(map(int, res)) if args.res else None
    if min(args.warmup or 1, args.steps or 1) < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


def main(argv=None) -> None:
    args, t0 = parse_args(argv), time.time()
    out = {"torch": torch.__version__, "small": args.small}
    print(f"minicat bench on {args.device}, torch {out['torch']}")
    try:
        if args.released:
            released_bench(args, out)
        if args.plan:
            memory_plan(args.small, out)
            validate_plan(out)
    finally:
        out["seconds"] = time.time() - t0
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
            print(f"\nwrote {args.json} ({out['seconds']:.0f} s)")
    if out.get("released", {}).get("failed"):
        raise SystemExit(f"error: configurations failed: {', '.join(out['released']['failed'])}")


if __name__ == "__main__":
    main()
