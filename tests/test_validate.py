"""validate.py as a user runs it, held to diffusers' pipelines on the same checkpoint, seed and prompts."""

import numpy as np
import pytest
import torch
from conftest import ROOT, diffusers_pipeline, psnr, run_script
from PIL import Image

VALIDATE = ROOT / "validate.py"


def reference(path, w, h, seed=0):
    """A smooth random picture (pure noise would make Lanczos resizing the whole story)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path)
    return path


@pytest.fixture
def small_edit_area(monkeypatch):
    """diffusers' edit pipeline always renders ~1 MP; shrink its area so tests stay quick (ours gets the same
    size through --resolution; the 1 MP default itself is checked once below and in test_model)."""
    import diffusers.pipelines.longcat_image.pipeline_longcat_image_edit as edit

    original = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: original(192 * 192, ratio))
    return lambda w, h: original(192 * 192, w / h)


@pytest.mark.parametrize(
    "ref_size,prompt,negative",
    [
        ((300, 180), "write 'SALE 50%' on the \u201cred\u201d sign", ""),
        ((140, 260), 'make the cat\'s hat "blue"', "blurry, low quality"),
    ],
)
def test_edit_matches_diffusers(tiny_edit, tmp_path, small_edit_area, ref_size, prompt, negative):
    ref = reference(tmp_path / "ref.png", *ref_size)
    w, h = small_edit_area(*ref_size)
    assert w != h
    out = tmp_path / "ours.png"
    run_script(
        VALIDATE,
        "--model",
        tiny_edit,
        "--ref",
        ref,
        "--prompt",
        prompt,
        "--negative-prompt",
        negative,
        "--steps",
        3,
        "--guidance",
        4.5,
        "--seed",
        7,
        "--resolution",
        f"{w}x{h}",
        "--out",
        out,
    )
    pipe = diffusers_pipeline(tiny_edit)
    want = pipe(
        Image.open(ref),
        prompt,
        negative_prompt=negative,
        num_inference_steps=3,
        guidance_scale=4.5,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    got = Image.open(out)
    assert got.size == want.size == (w, h)
    assert psnr(got, want) >= 60, psnr(got, want)


def test_edit_default_size_is_one_megapixel_and_matches_diffusers(tiny_edit, tmp_path):
    ref = reference(tmp_path / "ref.png", 160, 96, seed=3)
    run_script(
        VALIDATE,
        "--model",
        tiny_edit,
        "--ref",
        ref,
        "--prompt",
        "add a hat",
        "--steps",
        2,
        "--guidance",
        1.0,
        "--out",
        tmp_path / "ours.png",
    )
    want = diffusers_pipeline(tiny_edit)(
        Image.open(ref),
        "add a hat",
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    got = Image.open(tmp_path / "ours.png")
    assert got.size == want.size == (1328, 800)
    assert psnr(got, want) >= 60, psnr(got, want)


@pytest.mark.parametrize("renorm", [True, False])
def test_t2i_matches_diffusers(tiny_t2i, tmp_path, renorm):
    prompt, negative = 'a poster that says "LongCat" in bold letters', "ugly"
    out = tmp_path / "ours.png"
    flag = "--cfg-renorm" if renorm else "--no-cfg-renorm"
    run_script(
        VALIDATE,
        "--model",
        tiny_t2i,
        "--prompt",
        prompt,
        "--negative-prompt",
        negative,
        "--steps",
        3,
        "--guidance",
        4.0,
        "--seed",
        11,
        "--resolution",
        "256x160",
        flag,
        "--out",
        out,
    )
    pipe = diffusers_pipeline(tiny_t2i)
    want = pipe(
        prompt,
        negative_prompt=negative,
        height=160,
        width=256,
        num_inference_steps=3,
        guidance_scale=4.0,
        enable_cfg_renorm=renorm,
        enable_prompt_rewrite=False,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    got = Image.open(out)
    assert got.size == (256, 160)
    assert psnr(got, want) >= 60, psnr(got, want)


def test_the_seed_and_the_prompt_change_the_image(tiny_t2i, tmp_path):
    common = ("--model", tiny_t2i, "--steps", 2, "--resolution", "64x64")
    outs = [tmp_path / f"{i}.png" for i in range(3)]
    run_script(VALIDATE, *common, "--prompt", "a red fox", "--seed", 1, "--out", outs[0])
    run_script(VALIDATE, *common, "--prompt", "a red fox", "--seed", 2, "--out", outs[1])
    run_script(VALIDATE, *common, "--prompt", "a blue fox", "--seed", 1, "--out", outs[2])
    a, b, c = (np.asarray(Image.open(o)) for o in outs)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_default_output_never_overwrites_and_previews_are_saved(tiny_t2i, tmp_path):
    args = (VALIDATE, "--model", tiny_t2i, "--prompt", "x", "--steps", 4, "--resolution", "64x64")
    run_script(*args, cwd=tmp_path)
    run_script(*args, "--preview-every", 2, cwd=tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["t2i-0000.png", "t2i-0001-step002.png", "t2i-0001.png"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--model", "{tmp}/missing"), "no such folder"),
        (("--resolution", "100x64"), "multiples of 16"),
        (("--ref", "{tmp}/nope.png"), "cannot read the image"),
        (("--lora", "{tmp}/nope.safetensors"), "--lora {tmp}/nope.safetensors: no such file"),
        ((), "is an edit checkpoint: give the image to edit with --ref"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tiny_edit, tmp_path, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    model = [] if "--model" in extra else ["--model", tiny_edit]
    needs_ref = "--resolution" in extra or "--lora" in extra
    ref = ["--ref", reference(tmp_path / "r.png", 64, 64)] if needs_ref else []
    proc = run_script(VALIDATE, *model, *ref, "--prompt", "x", *extra, check=False)
    assert proc.returncode != 0
    assert message.format(tmp=tmp_path) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def peft_lora_file(ckpt, folder, rank=4, alpha=8, seed=0):
    """A LoRA made the usual way: peft on diffusers' transformer (alpha != rank), random B, saved as the
    diffusers trainers save it: keys `transformer.<module>.lora_A/B.weight` plus the peft config metadata."""
    from diffusers import LongCatImageTransformer2DModel
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = LongCatImageTransformer2DModel.from_pretrained(ckpt, subfolder="transformer")
    targets = [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "ff.net.2",
        "proj_mlp",
    ]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    FluxLoraLoaderMixin.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_from_peft_matches_diffusers(tiny_edit, tmp_path, small_edit_area):
    lora_file = peft_lora_file(tiny_edit, tmp_path)
    ref, (w, h) = reference(tmp_path / "ref.png", 200, 120), small_edit_area(200, 120)
    common = (
        "--model",
        tiny_edit,
        "--ref",
        ref,
        "--prompt",
        "add 'rain'",
        "--steps",
        3,
        "--resolution",
        f"{w}x{h}",
    )
    run_script(VALIDATE, *common, "--lora", lora_file, "--out", tmp_path / "lora.png")
    run_script(VALIDATE, *common, "--lora", lora_file, "--lora-scale", 0, "--out", tmp_path / "scale0.png")
    run_script(VALIDATE, *common, "--out", tmp_path / "base.png")
    pipe = diffusers_pipeline(tiny_edit)
    pipe.transformer.load_lora_adapter(lora_file, prefix="transformer", use_safetensors=True)
    want = pipe(
        Image.open(ref), "add 'rain'", num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    )
    got, base = Image.open(tmp_path / "lora.png"), Image.open(tmp_path / "base.png")
    assert psnr(got, want.images[0]) >= 60, psnr(got, want.images[0])
    assert psnr(got, base) < 45, "the LoRA should change the image"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "scale0.png")), np.asarray(base))


@pytest.mark.parametrize("mode,floor_db", [("int8", 35), ("fp8", 28)])
def test_quantized_transformer_stays_close_to_float(tiny_t2i, tmp_path, mode, floor_db):
    common = ("--model", tiny_t2i, "--prompt", "a lighthouse", "--steps", 4, "--resolution", "128x96")
    run_script(VALIDATE, *common, "--out", tmp_path / "float.png")
    run_script(VALIDATE, *common, "--quant", mode, "--text-encoder-quant", mode, "--out", tmp_path / "q.png")
    db = psnr(Image.open(tmp_path / "q.png"), Image.open(tmp_path / "float.png"))
    assert floor_db <= db < float("inf"), db


def test_unknown_quant_mode_is_named(tiny_t2i):
    proc = run_script(VALIDATE, "--model", tiny_t2i, "--prompt", "x", "--quant", "int4", check=False)
    assert proc.returncode != 0 and "--quant: unknown quantization mode 'int4'" in proc.stderr, proc.stderr


def test_int8_cuts_peak_resident_memory_where_the_transformer_dominates(tiny_t2i, tmp_path):
    """A checkpoint whose transformer (360 M parameters) dwarfs the rest: peak resident memory of validate.py
    with an int8 transformer (quantized tensor by tensor while it loads) must be at most 0.75x that with
    full-precision weights (float32 keeps the CPU matmuls quick; README gives the bf16 figures)."""
    import shutil

    import model as M

    ckpt = shutil.copytree(tiny_t2i, tmp_path / "big", ignore=shutil.ignore_patterns("transformer"))
    cfg = M.TransformerConfig(
        num_layers=3, num_single_layers=3, num_attention_heads=12, joint_attention_dim=64
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.LongCatTransformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}
    M.save_component(ckpt / "transformer", state, config, shards=3)
    del state
    peak = {}
    # VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's) high-water mark into ru_maxrss.
    code = (
        "import atexit, runpy, sys; atexit.register(lambda: print('PEAK', open('/proc/self/status').read()"
        ".split('VmHWM:')[1].split()[0], file=sys.stderr)); sys.argv = ['validate.py'] + sys.argv[1:]; "
        f"runpy.run_path({str(VALIDATE)!r}, run_name='__main__')"
    )
    for mode in ("none", "int8"):
        args = ("--model", ckpt, "--prompt", "x", "--steps", 1, "--guidance", 1, "--resolution", "64x64")
        proc = run_script(
            "-c", code, *args, "--dtype", "float32", "--quant", mode, "--out", tmp_path / "o.png"
        )
        peak[mode] = int(proc.stderr.split("PEAK")[1].split()[0])
    assert peak["int8"] <= 0.75 * peak["none"], peak


def test_bfloat16_runs_are_bit_exact_with_diffusers(tiny_edit, tiny_t2i, tmp_path, small_edit_area):
    """In bf16 every rounding counts: op order, fused ops, even the memory layout the VAE's convs see."""
    ref = reference(tmp_path / "ref.png", 200, 120)
    w, h = small_edit_area(200, 120)
    common = ("--steps", 3, "--seed", 5, "--dtype", "bfloat16")
    run_script(
        VALIDATE,
        "--model",
        tiny_edit,
        "--ref",
        ref,
        "--prompt",
        "add 'rain'",
        "--resolution",
        f"{w}x{h}",
        *common,
        "--out",
        tmp_path / "edit.png",
    )
    run_script(
        VALIDATE,
        "--model",
        tiny_t2i,
        "--prompt",
        "a 'neon' sign",
        "--negative-prompt",
        "dull",
        "--resolution",
        "128x96",
        *common,
        "--out",
        tmp_path / "t2i.png",
    )
    g = lambda: torch.Generator().manual_seed(5)
    edit = diffusers_pipeline(tiny_edit, torch.bfloat16)(
        Image.open(ref), "add 'rain'", num_inference_steps=3, generator=g()
    )
    t2i = diffusers_pipeline(tiny_t2i, torch.bfloat16)(
        "a 'neon' sign",
        negative_prompt="dull",
        height=96,
        width=128,
        num_inference_steps=3,
        enable_prompt_rewrite=False,
        generator=g(),
    )
    assert psnr(Image.open(tmp_path / "edit.png"), edit.images[0]) >= 60
    assert psnr(Image.open(tmp_path / "t2i.png"), t2i.images[0]) >= 60
