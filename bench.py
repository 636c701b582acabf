"""Speed and memory of minicat against diffusers + peft, and the memory plan for the released model.

    python bench.py [--quick] [--json out.json] [--device cuda|cpu]

1. A LoRA training step (forward, backward, AdamW; rank 16 on the 12 official targets) of model.py + lora.py
   vs diffusers' LongCatImageTransformer2DModel + peft, with identical weights, adapters and inputs,
   checkpointing on and off, on a mid-size config at the 256² edit lengths (256 target + 256 reference +
   539 text tokens; --quick narrows the model, not the sequence). CPU: fp32 (most CPUs emulate bf16
   matmuls), timed in process CPU time on one thread; CUDA: bf16 weights, fp32 adapters, bf16 autocast.
   The two alternate step by step, medians after warmup; the first losses must agree (LoRA B = 0: both
   are the base model) or the run stops.
2. The inference forward, ours vs diffusers.   3. quant.py int8 / fp8 forward vs unquantized, and int8 vs
   optimum-quanto's qint8 on the same layers (`pip install optimum-quanto`, not a requirement: else null).
4. The training-memory plan of the released transformer (D = 3072, 10 + 20 blocks), batch 1.
5. Cache building (data.build_caches, tiny checkpoint's encoders) and data.Loader ms/step.
6. validate.py's peak for a 1 MP edit; its stages run one at a time, so the peak is the largest stage.

Memory is allocated bytes as torch.cuda.max_memory_allocated counts them (nvidia-smi adds the CUDA context
and allocator slack, ~0.5-1 GB). On CUDA it is that counter; on CPU `PeakMemory` counts the storages ops
create, from creation until freed. Sections 4 and 6 run released-size modules on fake tensors (torch
FakeTensorMode: shapes, dtypes and autograd without data or compute), so activations are measured at the
true sequence lengths on any machine, under CPU bf16 autocast (CUDA's also runs LayerNorm in fp32: a few
transient [S, D] fp32 tensors more). Weight bytes are exact (meta-device models). Projected is only the
sum: weights + LoRA with fp32 grads and AdamW states + the 30 checkpointed block inputs + one incoming
gradient + the largest in-block peak (a block's forward + backward without checkpointing, which is what
its recomputation needs) + the final layer; a whole-model fake run checks it. Flash / memory-efficient SDPA
keeps attention memory linear in sequence length. The text encoder's activations (6) are analytic.
"""

import argparse
import copy
import json
import statistics
import tempfile
import time
import weakref
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lora
import model as M
import quant

GB, BF16, CPU = 1e9, torch.bfloat16, torch.device("cpu")  # decimal GB, as SPEC §8's "6.3 GB"
RELEASED = M.TransformerConfig()
D = RELEASED.num_attention_heads * RELEASED.attention_head_dim  # 3072
SIZES = {"quick": dict(heads=2, blocks=(2, 4), warmup=1, steps=7),
         "full": dict(heads=6, blocks=(4, 8), warmup=2, steps=5)}  # fmt: skip
QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)  # fmt: skip
QWEN_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)


class PeakMemory(TorchDispatchMode):
    """CPU stand-in for max_memory_allocated: bytes of the storages ops create inside the `with` (outputs
    that alias no input), each counted until it is freed; `.peak` is the high-water mark."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda tree: [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage()._cdata for t in tensors((args, kwargs))}
        for t in tensors(out):
            s = t.untyped_storage()
            if s._cdata not in inputs and s._cdata not in self.seen:  # views, in-place ops: no new bytes
                self.seen.add(s._cdata)
                self.live += s.nbytes()
                weakref.finalize(s, self._free, s._cdata, s.nbytes())  # storages die with their last user
        self.peak = max(self.peak, self.live)
        return out


def peak_bytes(fn, device=CPU) -> int:
    """Peak bytes that fn() allocates above what existed before it."""
    if device.type != "cuda":
        with PeakMemory() as pm:
            fn()
        return pm.peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def alternate(fns: dict, warmup: int, steps: int, device) -> dict:
    """Median seconds of each fn, run in turn (order flipped every round) so drift hits all alike. On CPU:
    process CPU time on one thread, which other load on a shared machine does not inflate."""
    cuda, threads = device.type == "cuda", torch.get_num_threads()
    clock, sync = (time.perf_counter, torch.cuda.synchronize) if cuda else (time.process_time, lambda: None)
    times = {k: [] for k in fns}
    torch.set_num_threads(threads if cuda else 1)
    for i in range(warmup + steps):
        for k in list(fns) if i % 2 == 0 else list(fns)[::-1]:
            sync()
            t0 = clock()
            fns[k]()
            sync()
            times[k].append(clock() - t0)
    torch.set_num_threads(threads)
    return {k: statistics.median(v[warmup:]) for k, v in times.items()}


def table(title: str, cols: list[str], rows: dict, width: int = 11, first: int = 46) -> None:
    print(f"\n## {title}\n{'':{first}}" + "".join(f"{c:>{width}}" for c in cols))
    for name, values in rows.items():
        cells = (f"{v:{width}.3f}" if isinstance(v, float) else f"{'-':>{width}}" for v in values)
        print(f"{name:{first}}" + "".join(cells))


def edit_lengths(res: int) -> tuple[int, int]:
    """(image tokens = target + reference, text tokens = 514 + Qwen's tokens of the half-size reference)."""
    return 2 * (res // 16) ** 2, 514 + round(res / 2 / 28) ** 2


def edit_inputs(res: int, device, txt_dtype=torch.float32):
    """img [1, 2N, 64] (target; reference), txt [1, L, 3584], sigma [1], img/txt ids, target [1, N, 64]."""
    (n, L), g, grid = edit_lengths(res), torch.Generator().manual_seed(0), res // 16
    img, txt = torch.randn(1, n, 64, generator=g), torch.randn(1, L, 3584, generator=g).to(txt_dtype)
    ids = torch.cat([M.image_ids(grid, grid, L, 1), M.image_ids(grid, grid, L, 2)])
    out = img, txt, torch.tensor([0.7]), ids, M.text_ids(L), torch.randn(1, n // 2, 64, generator=g)
    return [t.to(device) for t in out]


# ----------------------------------------------------------------------------------------------------------
# 1-3: ours vs diffusers + peft, and the quantized forward


def build_pair(cfg: M.TransformerConfig, device, dtype) -> tuple:
    from diffusers import LongCatImageTransformer2DModel

    torch.manual_seed(0)
    ours = M.LongCatTransformer(cfg)
    theirs = LongCatImageTransformer2DModel(**{**asdict(cfg), "axes_dims_rope": list(cfg.axes_dims_rope)})
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return tuple(m.to(device, dtype).eval().requires_grad_(False) for m in (ours, theirs))


def add_lora(ours, theirs) -> None:
    """The same rank-16 adapters on both (lora.py and peft); fp32 adapters, as lora.py makes them."""
    from peft import LoraConfig

    names = lora.inject_lora(ours, 16, 16, lora.DEFAULT_TARGETS)
    theirs.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(lora.DEFAULT_TARGETS)))
    ours_state, n = ours.state_dict(), 0
    for key, p in theirs.named_parameters():
        if "lora_" in key:
            p.data, n = ours_state[key.replace(".default.", ".")].clone().float(), n + 1
    assert n == 2 * len(names), f"peft adapted {n // 2} modules, lora.py {len(names)}"
    for m in (ours, theirs):
        lora.mark_only_lora_as_trainable(m)


def compare_models(size: dict, device, out: dict) -> None:
    (joint, single), width = size["blocks"], 128 * size["heads"]
    cfg = replace(RELEASED, num_attention_heads=size["heads"], num_layers=joint, num_single_layers=single)
    cuda = device.type == "cuda"
    dtype = BF16 if cuda else torch.float32
    ours, theirs = build_pair(cfg, device, dtype)
    img, txt, sigma, img_ids, txt_ids, target = edit_inputs(256, device, dtype)
    n, L, warm, steps = target.shape[1], txt.shape[1], size["warmup"], size["steps"]
    out["config"] = dict(width=width, blocks=size["blocks"], tokens=f"{n}+{n}+{L}", dtype=str(dtype))
    kw = dict(encoder_hidden_states=txt, timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
    fwd = {"ours": lambda x: ours(x, txt, sigma, img_ids, txt_ids), "theirs": lambda x: theirs(x, **kw)[0]}
    x = img.to(dtype)  # inference runs in the model dtype, as validate.py does; training under autocast
    with torch.no_grad():
        diff = (fwd["ours"](x) - fwd["theirs"](x)).abs().max().item()
        t = alternate({k: lambda f=f: f(x) for k, f in fwd.items()}, warm, 2 * steps, device)  # cheap: 2x
    out["infer_step_time_ratio"] = t["ours"] / t["theirs"]
    rows = {"inference forward": [t["ours"], t["theirs"], t["ours"] / t["theirs"]]}

    # 3. The quantized forward: copies of our base model, the same layers for quanto.
    quants = {"none": ours, "int8": copy.deepcopy(ours), "fp8": copy.deepcopy(ours)}
    for mode in ("int8", "fp8"):
        quant.quantize_model(quants[mode], mode)
    try:
        from optimum.quanto import freeze, qint8, quantize

        quants["quanto"] = copy.deepcopy(ours)
        quantize(quants["quanto"], weights=qint8, include=["*transformer_blocks.*"])  # as quant.py's
        freeze(quants["quanto"])
    except ImportError:
        print("optimum-quanto is not installed (pip install optimum-quanto): no quanto comparison")
    with torch.no_grad():
        calls = {k: lambda m=m: m(x, txt, sigma, img_ids, txt_ids) for k, m in quants.items()}
        tq = alternate(calls, warm, 2 * steps, device)
    out["int8_forward_time_ratio_vs_quanto"] = tq["int8"] / tq["quanto"] if "quanto" in tq else None
    out.update({f"{k}_forward_time_ratio_vs_unquantized": tq[k] / tq["none"] for k in ("int8", "fp8")})
    out["quant_forward_s"] = tq
    del quants

    # 1. Training steps. LoRA B starts at 0, so the first losses are the base model's and must agree.
    add_lora(ours, theirs)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]
    opts = {"ours": torch.optim.AdamW(trainable(ours)), "theirs": torch.optim.AdamW(trainable(theirs))}
    losses = {"ours": [], "theirs": []}

    def step(k):
        with torch.autocast(device.type, BF16, enabled=cuda):
            pred = fwd[k](img)
        loss = F.mse_loss(pred[:, :n].float(), target)
        loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        losses[k].append(loss.item())

    step("ours"), step("theirs")
    first = losses["ours"][0], losses["theirs"][0]
    assert abs(first[0] - first[1]) <= (2e-2 if cuda else 1e-5) * abs(first[1]), f"losses differ: {first}"
    for ckpt in (True, "keep_attention", False):  # diffusers has no selective mode: it checkpoints fully
        ours.gradient_checkpointing = ckpt
        theirs.enable_gradient_checkpointing() if ckpt else theirs.disable_gradient_checkpointing()
        tt = alternate({k: lambda k=k: step(k) for k in opts}, warm, steps, device)
        mem = {k: peak_bytes(lambda k=k: step(k), device) / GB for k in opts}  # AdamW states exist by now
        tag = {True: "", "keep_attention": "_keep_attention", False: "_no_ckpt"}[ckpt]
        out[f"train_step_time_ratio{tag}"] = tt["ours"] / tt["theirs"]
        out[f"train_step_memory_ratio{tag}"] = mem["ours"] / mem["theirs"]
        out[f"train_step_s{tag}"], out[f"train_step_peak_gb{tag}"] = tt, mem
        row = [tt["ours"], tt["theirs"], tt["ours"] / tt["theirs"], mem["ours"], mem["theirs"]]
        label = {True: "on", "keep_attention": "on, ours keep_attention", False: "off"}[ckpt]
        rows[f"train step, checkpointing {label}"] = row + [mem["ours"] / mem["theirs"]]
    out["first_loss"], out["forward_max_abs_diff"] = first, diff
    for k in ("ours", "theirs"):
        out[f"checkpointing_time_ratio_{k}"] = out["train_step_s"][k] / out["train_step_s_no_ckpt"][k]
    title = (f"1-2. ours vs diffusers + peft: D={width}, {joint}+{single} blocks, {n}+{n}+{L} tokens, "
             f"{dtype}; seconds; peak GB above the model and AdamW states")  # fmt: skip
    table(title, ["ours s", "theirs s", "ratio", "ours GB", "theirs GB", "ratio"], rows, 10, 36)
    print(f"forward max |ours - theirs| {diff:.1e}; first loss ours {first[0]:.6f}, theirs {first[1]:.6f}")
    title = "3. forward seconds, base weights quantized (quanto: optimum-quanto qint8)"
    table(title, list(tq), {"": list(tq.values())}, 10, 36)


# ----------------------------------------------------------------------------------------------------------
# 4 and 6: the released model's memory plan (meta device for bytes, fake tensors for activations)


def in_bf16(build):
    """build() with bf16 as the default dtype (fake parameters cannot be swapped by a later .to(dtype))."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(BF16)
    try:
        return build()
    finally:
        torch.set_default_dtype(default)


def released(mode: str, rank: int = 0, **kw) -> torch.nn.Module:
    """The released transformer in bf16 on the active device or fake mode, `mode` base, LoRA if rank."""
    m = in_bf16(lambda: M.LongCatTransformer(replace(RELEASED, **kw))).requires_grad_(False)  # as loaded
    quant.quantize_model(m, mode)
    if rank:
        lora.inject_lora(m, rank, rank)  # fp32 adapters
        lora.mark_only_lora_as_trainable(m)
    return m


def block_peaks(res: int, mode: str) -> dict:
    """Peak bytes of forward + backward of one released joint block, one single block (LoRA, no
    checkpointing: what a checkpointed block needs when recomputed), and the final layer + loss."""
    n, L = edit_lengths(res)
    with FakeTensorMode():
        m = released(mode, 16, num_layers=1, num_single_layers=1)
        temb, freqs = torch.randn(1, D, dtype=BF16), torch.randn(n + L, 64, dtype=torch.complex64)
        img, txt, x = (torch.randn(1, s, D, dtype=BF16, requires_grad=True) for s in (n, L, n + L))
        g_img, g_txt, g_x = (torch.randn(1, s, D, dtype=BF16) for s in (n, L, n + L))
        final = lambda: m.proj_out(M.modulate(x[:, L : L + n // 2], *m.norm_out(temb)[::-1]))  # scale, shift
        joint = m.transformer_blocks[0]
        runs = {
            "joint": lambda: torch.autograd.backward(joint(img, txt, temb, freqs), [g_img, g_txt]),
            "single": lambda: m.single_transformer_blocks[0](x, temb, freqs).backward(g_x),
            "final": lambda: F.mse_loss(final().float(), torch.randn(1, n // 2, 64)).backward(),
        }
        with torch.autocast("cpu", BF16):
            return {k: peak_bytes(f) for k, f in runs.items()}


def whole_model_peak(res: int, mode: str, train: bool) -> int:
    """Peak bytes above the weights of the released model on fake tensors: a checkpointed LoRA training step
    under bf16 autocast, or (train=False) one bf16 no-grad forward as validate.py runs it."""
    with FakeTensorMode():
        m = released(mode, 16 if train else 0)
        m.gradient_checkpointing = True
        img, txt, sigma, ids, tids, target = edit_inputs(res, CPU, BF16)

        def run():
            with torch.autocast("cpu", BF16, enabled=train), torch.set_grad_enabled(train):
                pred = m(img if train else img.to(BF16), txt, sigma, ids, tids)
            if train:
                F.mse_loss(pred[:, : target.shape[1]].float(), target).backward()

        return peak_bytes(run)


def project_training(res: int, mode: str, check: bool = False) -> dict:
    """Bytes of each part of a LoRA training step at a res² edit (batch 1, checkpointing, cached inputs)."""
    n, L = edit_lengths(res)
    with torch.device("meta"):
        m = released(mode, 16)
    n_lora, peaks = sum(p.numel() for k, p in m.named_parameters() if "lora_" in k), block_peaks(res, mode)
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
    if check:  # weights and AdamW states outside, LoRA grads inside the measured peak
        check = whole_model_peak(res, mode, True)
        parts["whole model on fake tensors (check)"] = quant.weight_bytes(m) + 8 * n_lora + check
    return parts


def validate_plan(out: dict) -> None:
    """validate.py's stages for a 1 MP edit (1024² output) with bf16 or int8 weights, in GB."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):  # exact text encoder bytes, from the real module tree
        config = Qwen2_5_VLConfig(text_config=QWEN_7B, vision_config=QWEN_7B_VISION)
        te, vae_w = Qwen2_5_VLForConditionalGeneration(config), quant.weight_bytes(M.VAE().to(BF16))
    total = sum(p.numel() for p in te.parameters())
    assert total == 8_292_166_656, f"Qwen2.5-VL-7B has 8,292,166,656 parameters, not {total:,}"
    te = te.model.to(BF16)  # model.load_text_encoder keeps the backbone: lm_head is never used
    te_w = {"bf16": quant.weight_bytes(te)}
    quant.quantize_model(te, "int8", targets=quant.TEXT_ENCODER_TARGETS)  # on the CPU, before the move
    te_w["int8"] = quant.weight_bytes(te)
    n, L = edit_lengths(1024)
    T, h = L + 80, QWEN_7B["hidden_size"]  # ~75 system-prompt tokens before <|vision_start|>, 5 after
    te_act = (QWEN_7B["num_hidden_layers"] + 1) * T * h * 2 + 3 * T * QWEN_7B["intermediate_size"] * 2
    with FakeTensorMode(), torch.no_grad():
        vae = in_bf16(M.VAE)
        decode = peak_bytes(lambda: vae.decode(torch.randn(1, 16, 128, 128, dtype=BF16)))
    cols = {}
    for name, mode in (("bf16", "none"), ("int8", "int8")):
        with torch.device("meta"):
            tr_w = quant.weight_bytes(released(mode))
        s = cols[name] = {
            "1 text encoder weights (exact, no lm_head)": te_w[name],
            "  + activations (analytic: 29 hidden states, MLP)": te_act,
            "2 transformer + VAE weights (exact; VAE stays)": tr_w + vae_w,
            "  + forward activations (fake) + embeddings": whole_model_peak(1024, mode, False) + 4 * L * h,
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


def memory_plan(quick: bool, out: dict) -> None:
    cols = [(512, "int8"), (768, "int8"), (1024, "int8"), (768, "bf16"), (1024, "bf16")]
    cols += [] if quick else [(768, "fp8"), (1024, "fp8")]
    check = lambda r, m: not quick or (r, m) == (768, "int8")  # the whole-model check, ~15 s each on CPU
    plans = [project_training(r, "none" if m == "bf16" else m, check(r, m)) for r, m in cols]
    names = dict.fromkeys(k for p in plans for k in p)
    rows = {k: [p[k] / GB if k in p else None for p in plans] for k in names}
    title = ("4. training plan, GB: released transformer, LoRA r16 (12 targets), batch 1, checkpointing, "
             "bf16 autocast, cached inputs; (fake) = measured on fake tensors at true lengths")  # fmt: skip
    table(title, [f"{r}² {m}" for r, m in cols], rows)
    for (r, m), p in zip(cols, plans, strict=True):
        out[f"projected_peak_gb_edit_{r}_{m}"] = p["total (projected)"] / GB
        if "whole model on fake tensors (check)" in p:
            out[f"fake_whole_model_peak_gb_edit_{r}_{m}"] = p["whole model on fake tensors (check)"] / GB
    print(f"target 768² int8 <= 10 GB: {out['projected_peak_gb_edit_768_int8']:.2f} GB (+ CUDA context)")
    with torch.device("meta"):
        weights = {mode: quant.weight_bytes(released(mode)) for mode in ("none", "int8", "fp8")}
    out["int8_weight_bytes_ratio"] = weights["int8"] / weights["none"]
    out["fp8_weight_bytes_ratio"] = weights["fp8"] / weights["none"]


# ----------------------------------------------------------------------------------------------------------
# 5: cache building and loading through data.py


def bench_data(quick: bool, device, out: dict) -> None:
    import numpy as np
    from PIL import Image

    import data

    pairs, res = (6, 256) if quick else (12, 512)
    with tempfile.TemporaryDirectory() as tmp:
        tmp, rng = Path(tmp), np.random.default_rng(0)
        ckpt = M.write_tiny_checkpoint(tmp / "ckpt", "edit")
        for i in range(pairs):
            for d in ("edit", "ref"):
                (tmp / d).mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (res, res, 3), np.uint8)).save(tmp / d / f"{i}.png")
            (tmp / "edit" / f"{i}.txt").write_text(f"make the sky colour number {i}")

        def scan(resolution: int, cache: str) -> tuple[list, list]:
            common = dict(resolution=resolution, cache_dir_text=f"{cache}/text")
            edit = dict(id="edit", instance_data_dir="edit", cache_dir_vae=f"{cache}/edit", **common,
                        caption_strategy="textfile", conditioning_data="ref")  # fmt: skip
            ref = dict(id="ref", instance_data_dir="ref", cache_dir_vae=f"{cache}/ref", **common)
            sets = data.parse_datasets([edit, ref], tmp)
            return sets, data.scan(sets)

        vae, te = M.load_vae(ckpt, torch.float32, device), M.load_text_encoder(ckpt, torch.float32, device)
        encode_latents, encode_text = (
            lambda x: M.to_latent(vae, x.to(device)).cpu(),
            lambda *a: te.encode(*a).cpu(),
        )
        sets, samples = scan(res, "tiny")
        t0 = time.perf_counter()
        data.build_caches(sets, encode_latents, encode_text, "tiny", "float32", False, samples)
        pairs_s = pairs / (time.perf_counter() - t0)
        # The loader on entries of the real sizes at 768² (f32 latents, bf16 [710, 3584] embeddings), written
        # through the same cache code by stand-in encoders.
        sets, samples = scan(768, "real")
        zeros_text = lambda prompt, ref: torch.zeros(1, edit_lengths(768)[1], 3584, dtype=BF16)
        zeros_latent = lambda x: torch.zeros(1, 16, x.shape[2] // 8, x.shape[3] // 8)
        data.build_caches(sets, zeros_latent, zeros_text, "shapes", "bfloat16", False, samples)
        it = iter(data.Loader(samples, batch_size=1, seed=0))
        next(it)
        t0 = time.perf_counter()
        for _ in range(4 * pairs):
            next(it)
        loader_ms = 1000 * (time.perf_counter() - t0) / (4 * pairs)
    out.update(cache_pairs_per_s=pairs_s, cache_images_per_s=2 * pairs_s, loader_ms_per_step_768=loader_ms)
    print(f"\n## 5. data.py\ncache build, tiny checkpoint's encoders, {pairs} edit pairs at {res}²: "
          f"{pairs_s:.2f} pairs/s = {2 * pairs_s:.2f} images/s (a pair: 2 latents + 2 text embeddings)\n"
          f"Loader, batch 1, real-size 768² entries, warm page cache: {loader_ms:.1f} ms/step")  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a narrower model in 1-3: minutes on 2 CPU cores")
    p.add_argument("--json", type=Path, help="write every number to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for 1-3")
    args = p.parse_args(argv)
    device, t0 = torch.device(args.device), time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu, 1 thread, CPU time"
    out = {"device": name, "torch": torch.__version__, "size": "quick" if args.quick else "full"}
    print(f"minicat bench ({out['size']}) on {name}, torch {out['torch']}")
    compare_models(SIZES[out["size"]], device, out)
    memory_plan(args.quick, out)
    validate_plan(out)
    bench_data(args.quick, device, out)
    out["seconds"] = time.time() - t0
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"\nwrote {args.json} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
