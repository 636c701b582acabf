"""validate.py as a user runs it, held to diffusers' pipelines on the same checkpoint, seed and
prompts; its prompt encoding held to diffusers' encode_prompt; every input checked before a model
loads; nothing overwritten; each model read from disk once."""

import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, diffusers_pipeline, psnr, run_script, validate_cli
from PIL import Image
from safetensors.torch import load_file, save_file

import files
import images
import lora
import model as M
import pipeline
import validate


def reference(path, w, h, seed=0):
    """A smooth random picture (pure noise would make Lanczos resizing the whole story)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture
def small_edit_area(monkeypatch):
    """diffusers' edit pipeline always renders ~1 MP; shrink its area so tests stay quick (ours gets
    the same size through --resolution; the 1 MP default itself is checked once below and in
    test_model)."""
    import diffusers.pipelines.longcat_image.pipeline_longcat_image_edit as edit

    original = edit.calculate_dimensions
    monkeypatch.setattr(
        edit, "calculate_dimensions", lambda area, ratio: original(192 * 192, ratio)
    )
    return lambda w, h: original(192 * 192, w / h)


def diffusers_edit(ckpt, ref, prompt, steps, seed=0, dtype=None, lora_file=None, **kw):
    pipe = diffusers_pipeline(ckpt, dtype)
    if lora_file is not None:
        pipe.transformer.load_lora_adapter(lora_file, prefix="transformer", use_safetensors=True)
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(Image.open(ref), prompt, num_inference_steps=steps, generator=g, **kw).images[0]


# --------------------------------------------------------------------------------------------------
# Prompt encoding

PROMPTS = [
    "make the sky blue",
    "write 'Hello World' on the sign",
    'replace the text with "OPEN 24h" and don\'t touch the rest',
    "add \u201cdouble\u201d and \u2018single\u2019 curly quotes, plus 'three' spans",
    "",
    "unbalanced 'quote here",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_quote_splitting_matches_diffusers(prompt):
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import split_quotation

    assert pipeline.split_quotes(prompt) == split_quotation(prompt)


def test_quoted_text_is_tokenised_by_character(tiny_edit):
    te = pipeline.load_text_encoder(tiny_edit, torch.float32)
    assert len(te.ids("blue")) < 4  # the tiny BPE merges this word ...
    ids = te.tokenize("make it 'blue'")
    assert ids == te.ids("make it ") + [
        i for ch in "'blue'" for i in te.ids(ch)
    ]  # ... but not when quoted
    assert len(te.tokenize("word " * 600)) == pipeline.MAX_PROMPT_TOKENS


@pytest.fixture(scope="module")
def edit_pair(tiny_edit):
    return pipeline.load_text_encoder(tiny_edit, torch.float32), diffusers_pipeline(tiny_edit)


@pytest.mark.parametrize("prompt", PROMPTS[:4])
@pytest.mark.parametrize("size", [(320, 192), (208, 400)])
def test_edit_prompt_embeddings_match_diffusers(edit_pair, prompt, size):
    te, pipe = edit_pair
    rng = np.random.default_rng(size[0])
    ref = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    half = ref.resize((size[0] // 2, size[1] // 2), Image.LANCZOS)  # what the pipeline hands Qwen
    want, _ = pipe.encode_prompt(prompt=prompt, image=half)
    got = te.encode(prompt, ref)
    # smart_resize to multiples of 28, then 2x2 merge
    n_vl = round(size[0] / 2 / 28) * round(size[1] / 2 / 28)
    assert got.shape == want.shape and got.shape[1] == 514 + n_vl, (got.shape, want.shape)
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()


def test_t2i_prompt_embeddings_match_diffusers(tiny_t2i):
    te, pipe = pipeline.load_text_encoder(tiny_t2i, torch.float32), diffusers_pipeline(tiny_t2i)
    for prompt in PROMPTS:
        want, _ = pipe.encode_prompt(prompt=prompt)
        got = te.encode(prompt)
        assert got.shape == (1, 512, 64)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (prompt, (got - want).abs().max())


# --------------------------------------------------------------------------------------------------
# The pipeline against diffusers'


@pytest.mark.parametrize(
    "ref_size,prompt,negative",
    [
        ((300, 180), "write 'SALE 50%' on the \u201cred\u201d sign", ""),
        ((140, 260), 'make the cat\'s hat "blue"', "blurry, low quality"),
    ],
)
def test_edit_matches_diffusers(tiny_edit, tmp_path, small_edit_area, ref_size, prompt, negative):
    ref, (w, h) = reference(tmp_path / "ref.png", *ref_size), small_edit_area(*ref_size)
    assert w != h
    out = tmp_path / "ours.png"
    validate_cli(
        model=tiny_edit,
        ref=ref,
        prompt=prompt,
        negative_prompt=negative,
        steps=3,
        seed=7,
        resolution=f"{w}x{h}",
        out=out,
    )
    want = diffusers_edit(
        tiny_edit, ref, prompt, 3, seed=7, negative_prompt=negative, guidance_scale=4.5
    )
    assert Image.open(out).size == want.size == (w, h)
    assert psnr(Image.open(out), want) >= 60, psnr(Image.open(out), want)


def test_edit_default_size_is_one_megapixel_and_matches_diffusers(tiny_edit, tmp_path):
    ref = reference(tmp_path / "ref.png", 160, 96, seed=3)
    validate_cli(
        model=tiny_edit,
        ref=ref,
        prompt="add a hat",
        steps=2,
        guidance=1.0,
        out=tmp_path / "ours.png",
    )
    want = diffusers_edit(tiny_edit, ref, "add a hat", 2, guidance_scale=1.0)
    got = Image.open(tmp_path / "ours.png")
    assert got.size == want.size == (1328, 800)
    assert psnr(got, want) >= 60, psnr(got, want)


@pytest.mark.parametrize("renorm", [True, False])
def test_t2i_matches_diffusers(tiny_t2i, tmp_path, renorm):
    prompt, negative, out = (
        'a poster that says "LongCat" in bold letters',
        "ugly",
        tmp_path / "ours.png",
    )
    validate_cli(
        model=tiny_t2i,
        prompt=prompt,
        negative_prompt=negative,
        steps=3,
        guidance=4.0,
        seed=11,
        resolution="256x160",
        cfg_renorm=renorm,
        no_cfg_renorm=not renorm,
        out=out,
    )
    g = torch.Generator("cpu").manual_seed(11)
    want = diffusers_pipeline(tiny_t2i)(
        prompt,
        negative_prompt=negative,
        height=160,
        width=256,
        num_inference_steps=3,
        guidance_scale=4.0,
        enable_cfg_renorm=renorm,
        enable_prompt_rewrite=False,
        generator=g,
    ).images[0]
    assert Image.open(out).size == (256, 160)
    assert psnr(Image.open(out), want) >= 60, psnr(Image.open(out), want)


def test_bfloat16_runs_are_bit_exact_with_diffusers(tiny_edit, tiny_t2i, tmp_path, small_edit_area):
    """In bf16 every rounding counts: op order, fused ops, even the memory layout the VAE's convs
    see."""
    ref, (w, h) = reference(tmp_path / "ref.png", 200, 120), small_edit_area(200, 120)
    common = dict(steps=3, seed=5, dtype="bfloat16")
    validate_cli(
        model=tiny_edit,
        ref=ref,
        prompt="add 'rain'",
        resolution=f"{w}x{h}",
        out=tmp_path / "e.png",
        **common,
    )
    validate_cli(
        model=tiny_t2i,
        prompt="a 'neon' sign",
        negative_prompt="dull",
        resolution="128x96",
        out=tmp_path / "t.png",
        **common,
    )
    edit = diffusers_edit(tiny_edit, ref, "add 'rain'", 3, seed=5, dtype=torch.bfloat16)
    t2i = diffusers_pipeline(tiny_t2i, torch.bfloat16)(
        "a 'neon' sign",
        negative_prompt="dull",
        height=96,
        width=128,
        num_inference_steps=3,
        enable_prompt_rewrite=False,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(edit))
    assert np.array_equal(pixels(tmp_path / "t.png"), np.asarray(t2i))


def test_the_seed_and_the_prompt_change_the_image(tiny_t2i, tmp_path):
    common = dict(model=tiny_t2i, steps=2, resolution="64x64")
    validate_cli(prompt="a red fox", seed=1, out=tmp_path / "0.png", **common)
    validate_cli(prompt="a red fox", seed=2, out=tmp_path / "1.png", **common)
    validate_cli(prompt="a blue fox", seed=1, out=tmp_path / "2.png", **common)
    a, b, c = (pixels(tmp_path / f"{i}.png") for i in range(3))
    # a new seed is new noise; a new prompt moves a tiny random model only a little, but it moves it
    changed = (a != c).any(axis=-1).mean()  # the share of pixels the prompt moved
    assert psnr(a, b) < 30, psnr(a, b)
    assert changed > 0.2 and psnr(a, c) < 60, (changed, psnr(a, c))


def peft_lora_file(ckpt, folder, rank=4, alpha=8, seed=0):
    """A LoRA made the usual way: peft on diffusers' transformer (alpha != rank), random B, saved as
    the diffusers trainers save it: keys `transformer.<module>.lora_A/B.weight` plus the peft config
    metadata."""
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
    common = dict(model=tiny_edit, ref=ref, prompt="add 'rain'", steps=3, resolution=f"{w}x{h}")
    validate_cli(lora=lora_file, out=tmp_path / "lora.png", **common)
    validate_cli(lora=lora_file, lora_scale=0, out=tmp_path / "scale0.png", **common)
    validate_cli(out=tmp_path / "base.png", **common)
    want = diffusers_edit(tiny_edit, ref, "add 'rain'", 3, lora_file=lora_file)
    got, base = Image.open(tmp_path / "lora.png"), Image.open(tmp_path / "base.png")
    assert psnr(got, want) >= 60, psnr(got, want)
    assert psnr(got, base) < 45, "the LoRA should change the image"
    assert np.array_equal(pixels(tmp_path / "scale0.png"), np.asarray(base))


@pytest.mark.parametrize("mode,floor_db", [("int8", 35), ("fp8", 28)])
def test_quantized_transformer_stays_close_to_float(tiny_t2i, tmp_path, mode, floor_db):
    common = dict(model=tiny_t2i, prompt="a lighthouse", steps=4, resolution="128x96")
    validate_cli(out=tmp_path / "float.png", **common)
    validate_cli(quant=mode, text_encoder_quant=mode, out=tmp_path / "q.png", **common)
    db = psnr(Image.open(tmp_path / "q.png"), Image.open(tmp_path / "float.png"))
    assert floor_db <= db < float("inf"), db


def test_int8_cuts_peak_resident_memory_where_the_transformer_dominates(tiny_t2i, tmp_path):
    """A checkpoint whose transformer (360 M parameters) dwarfs the rest: peak resident memory of
    validate.py with an int8 transformer (quantized tensor by tensor while it loads) must be at most
    0.75x that with full-precision weights (float32 keeps the CPU matmuls quick; README gives the
    bf16 figures)."""
    import shutil

    import tiny

    ckpt = shutil.copytree(tiny_t2i, tmp_path / "big", ignore=shutil.ignore_patterns("transformer"))
    cfg = M.TransformerConfig(
        num_layers=3, num_single_layers=3, num_attention_heads=12, joint_attention_dim=64
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.LongCatTransformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}
    tiny.save_component(ckpt / "transformer", state, config, shards=3)
    del state
    # VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's) high-water mark into
    # ru_maxrss.
    code = (
        "import atexit, runpy, sys; "
        "atexit.register(lambda: print('PEAK', open('/proc/self/status').read()"
        ".split('VmHWM:')[1].split()[0], file=sys.stderr)); sys.argv = ['validate.py'] + sys.argv[1:]; "
        f"runpy.run_path({str(ROOT / 'validate.py')!r}, run_name='__main__')"
    )
    peak = {}
    for mode in ("none", "int8"):
        args = [
            "--model",
            ckpt,
            "--prompt",
            "x",
            "--steps",
            1,
            "--guidance",
            1,
            "--resolution",
            "64x64",
        ]
        out = ["--dtype", "float32", "--quant", mode, "--out", tmp_path / f"{mode}.png"]
        peak[mode] = int(run_script("-c", code, *args, *out).stderr.split("PEAK")[1].split()[0])
    assert peak["int8"] <= 0.75 * peak["none"], peak


# --------------------------------------------------------------------------------------------------
# Inputs: read as training reads them, checked before any model loads


def test_a_size_that_would_stretch_the_reference_keeps_its_aspect_and_says_so(tiny_edit, tmp_path):
    """--resolution 16x256 for a 4:3 reference would squash it to 1:16: the edit keeps 4:3 at that
    area (80x64), as training's validation does, with a warning; a second reference of another
    shape is named as stretched. Catches the silent squash."""
    a, b = reference(tmp_path / "a.png", 64, 48), reference(tmp_path / "b.png", 48, 64, seed=1)
    out = tmp_path / "o.png"
    proc = validate_cli(
        model=tiny_edit, ref=[a, b], prompt="x", steps=1, resolution="16x256", out=out
    )
    assert Image.open(out).size == (80, 64)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: 16x256 would stretch the reference (64x48) by 2033%: the edit keeps the "
        "reference's aspect at that area, 80x64",
        "warning: reference 2 (48x64) is stretched by 67% to 80x64, the first reference's shape",
    ], proc.stderr


def test_an_exif_rotated_portrait_is_edited_as_a_portrait(tiny_edit, tmp_path):
    landscape = Image.open(reference(tmp_path / "r.png", 128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was turned; viewers show it rotated 90° clockwise
    landscape.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    validate_cli(
        model=tiny_edit, ref=tmp_path / "portrait.jpg", prompt="x", steps=1, out=tmp_path / "o.png"
    )
    w, h = Image.open(tmp_path / "o.png").size
    assert h > w, (w, h)


def test_a_transparent_reference_is_its_copy_on_white(tiny_edit, tmp_path):
    rgb = np.asarray(Image.open(reference(tmp_path / "r.png", 96, 64)))
    alpha = np.zeros((64, 96), np.uint8)
    alpha[:, 48:] = 255  # the left half clear: its hidden colour must not show
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    white = rgb.copy()
    white[:, :48] = 255
    Image.fromarray(white).save(tmp_path / "white.png")
    common = dict(model=tiny_edit, prompt="x", steps=2, resolution="96x64")
    validate_cli(ref=tmp_path / "rgba.png", out=tmp_path / "a.png", **common)
    validate_cli(ref=tmp_path / "white.png", out=tmp_path / "b.png", **common)
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


def bad_lora(kind: str, tmp_path):
    """A pickle named .safetensors, a LoRA of the wrong shape, or one holding NaN."""
    path, key = tmp_path / f"{kind}.safetensors", "transformer.transformer_blocks.0.attn.to_q"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"a": 1}))
        return path
    if kind == "torchsave":
        torch.save({"a": torch.zeros(1)}, path)
        return path
    a = torch.zeros(4, 65) if kind == "shape" else torch.full((4, 64), float("nan"))
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": torch.zeros(64, 4)}, str(path))
    return path


@pytest.mark.parametrize(
    "extra,message",
    [
        (dict(model="{tmp}/missing"), "no such folder"),
        (dict(resolution="100x64"), "multiples of 16"),
        (dict(ref="{tmp}/nope.png"), "--ref {tmp}/nope.png: cannot read image"),
        (dict(lora="{tmp}/nope.safetensors"), "--lora {tmp}/nope.safetensors: no such file"),
        (dict(lora="{tmp}/garbage.safetensors"), "garbage.safetensors: not a readable safetensors"),
        (dict(ref=None), "is an edit checkpoint: give the image to edit with --ref"),
        (dict(lora="pickle"), "pickle.safetensors: a PyTorch pickle (.pt/.bin/.ckpt), which is"),
        (dict(lora="torchsave"), "torchsave.safetensors: a PyTorch pickle"),
        (dict(lora="{tmp}/d.png"), "d.png holds none of"),  # a folder: an output_dir's LoRA
        (dict(lora="shape"), "to_q.lora_A.weight: expected shape (4, 64), got (4, 65)"),
        (dict(lora="nan"), "to_q.lora_A.weight holds NaN"),
        (dict(lora_scale="nan"), "--lora-scale nan: must be a finite number"),
        (dict(steps=0), "--steps 0: must be between 1 and 1000"),
        (dict(seed=-1), "--seed -1: must be between"),
        (dict(device="bogus"), "--device 'bogus': not a device"),
        (dict(device="cuda:99"), "--device 'cuda:99': not available here"),
        (dict(out="{tmp}/file.txt/o.png"), "{tmp}/file.txt is a file, not a folder"),
        (dict(out="{tmp}/r.png", overwrite=True), "--out {tmp}/r.png is the reference --ref"),
        (dict(out="{tmp}/./r.png", overwrite=True), "is the reference --ref {tmp}/r.png"),
        (dict(out="{tmp}/d.png", overwrite=True), "--out {tmp}/d.png: is a folder"),
        (dict(out=""), "--out is empty"),
        (dict(prompt="   "), "--prompt is required"),
        (dict(prompt="caf\udce9"), "--prompt: not valid UTF-8 text"),  # the byte 0xE9 alone
        (dict(quant="int4"), "--quant: unknown quantization mode 'int4'"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(tiny_edit, tmp_path, extra, message):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "d.png").mkdir()
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00" * 64)
    ref = reference(tmp_path / "r.png", 64, 64)
    before = ref.read_bytes()
    args = dict(model=tiny_edit, ref=ref, prompt="x", steps=1, out=tmp_path / "o.png")
    for key, value in extra.items():
        value = (
            str(bad_lora(value, tmp_path))
            if key == "lora" and value in ("pickle", "torchsave", "shape", "nan")
            else value
        )
        args[key] = value.format(tmp=tmp_path) if isinstance(value, str) else value
    proc = validate_cli(**{k: v for k, v in args.items() if v is not None}, check=False)
    assert_one_line_error(proc, message.format(tmp=tmp_path))
    printed = proc.stdout + proc.stderr  # tqdm's bars go to stdout, transformers' to stderr
    assert "Loading weights" not in printed and "sampling" not in printed, printed  # nothing loaded
    assert not (tmp_path / "o.png").exists()
    assert ref.read_bytes() == before  # the reference is as it was


def test_a_decompression_bomb_reference_is_refused(tiny_edit, tmp_path):
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81 MP of nothing, a few kB on disk
    proc = validate_cli(
        model=tiny_edit, ref=tmp_path / "bomb.png", prompt="x", out=tmp_path / "o.png", check=False
    )
    assert_one_line_error(proc, "bomb.png: cannot read image (9000x9000 is over 64 MP")


def test_an_image_past_pillows_own_limit_gets_the_same_line(tmp_path):
    """Over 179 MP Pillow refuses at open, before minicat reads the size: the same plain line, not
    Pillow's "decompression bomb DOS attack". Catches the bomb error passed through as is."""
    Image.new("1", (20000, 20000)).save(tmp_path / "huge.png")  # 400 MP, 50 kB on disk
    with pytest.raises(images.ImageError) as e:
        images.load_rgb(tmp_path / "huge.png", key="--ref")
    assert str(e.value).endswith("huge.png: cannot read image (381 MP is over 64 MP; downscale it)")


def test_an_existing_out_is_never_replaced_without_overwrite(tiny_t2i, tmp_path):
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's own picture")
    common = dict(model=tiny_t2i, prompt="x", steps=1, resolution="64x64", out=out)
    assert_one_line_error(validate_cli(**common, check=False), "already exists; pass --overwrite")
    assert out.read_bytes() == b"the user's own picture"
    validate_cli(**common, overwrite=True)
    assert Image.open(out).size == (64, 64)


def test_default_output_never_overwrites_and_previews_are_saved(tiny_t2i, tmp_path):
    """Also: a killed run's temporary (a dead PID's) in the output folder is removed, a live
    one's is not."""
    dead = tmp_path / f"t2i-0000.png.tmp-{files.HOST}-{2**22 + 12345}"
    live = tmp_path / f"t2i-0009.png.tmp-{files.HOST}-{os.getppid()}"
    dead.write_bytes(b"half a png")
    live.write_bytes(b"being written")
    args = dict(model=tiny_t2i, prompt="x", steps=4, resolution="64x64")
    validate_cli(cwd=tmp_path, **args)
    assert not dead.exists() and live.exists()
    live.unlink()
    validate_cli(cwd=tmp_path, preview_every=2, **args)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["t2i-0000.png", "t2i-0001-step002.png", "t2i-0001.png"], names


def test_a_non_finite_result_is_an_error_not_a_black_picture(tiny_t2i, tmp_path):
    """A finite LoRA that blows the activations up: the sampled latent is inf/NaN."""
    model = M.load_transformer(tiny_t2i, torch.float32)
    lora.inject_lora(model, 4, 4, targets=["attn.to_q", "ff.net.2"])
    for m in lora._lora_layers(model).values():
        m.lora_B.weight.data.fill_(3e38)
    lora.save_lora(tmp_path / "huge.safetensors", model)
    args = dict(model=tiny_t2i, prompt="x", steps=1, resolution="64x64", out=tmp_path / "o.png")
    proc = validate_cli(lora=tmp_path / "huge.safetensors", check=False, **args)
    assert_one_line_error(proc, "the sampled image is not finite")
    assert not (tmp_path / "o.png").exists()


def test_a_vae_that_decodes_nan_is_an_error_not_a_dark_picture(tiny_t2i, tmp_path):
    """A NaN in the VAE decoder's last bias: the latent is finite, the pixels are not (and would be
    written as 0). Catches only the latent checked."""
    ckpt = shutil.copytree(tiny_t2i, tmp_path / "ckpt")
    (vae,) = (ckpt / "vae").glob("*.safetensors")
    weights = dict(load_file(str(vae)))
    weights["decoder.conv_out.bias"] = torch.full_like(weights["decoder.conv_out.bias"], math.nan)
    save_file(weights, str(vae))
    args = dict(model=ckpt, prompt="x", steps=1, resolution="64x64", out=tmp_path / "o.png")
    proc = validate_cli(check=False, **args)
    assert_one_line_error(proc, "the decoded image is not finite", "the VAE's weights")
    assert not (tmp_path / "o.png").exists()


# --------------------------------------------------------------------------------------------------
# Models: read once, on the device only while needed; out-of-memory as one line


def count_reads(monkeypatch) -> dict[str, int]:
    """Count every read of each model from disk (model.py's loaders and validate's text encoder
    loader)."""
    reads = {"vae": 0, "transformer": 0, "text_encoder": 0}
    for owner, name in ((M, "vae"), (M, "transformer"), (pipeline, "text_encoder")):
        load = getattr(owner, f"load_{name}")

        def counted(*args, _load=load, _name=name, **kwargs):
            reads[_name] += 1
            return _load(*args, **kwargs)

        monkeypatch.setattr(owner, f"load_{name}", counted)
    return reads


def test_each_model_is_read_once_however_many_images(tiny_edit, tmp_path, monkeypatch):
    reads = count_reads(monkeypatch)
    models = pipeline.Models(tiny_edit, "cpu", torch.float32, pipeline.LoadOptions())
    ref = Image.open(reference(tmp_path / "r.png", 64, 64))
    settings = pipeline.Settings((64, 64), steps=1)
    first = [pipeline.render(models, p, ref, settings, progress=False)[0] for p in ("a", "b", "a")]
    assert reads == {"vae": 1, "transformer": 1, "text_encoder": 1} == dict(models.loads), reads
    assert np.array_equal(
        np.asarray(first[0]), np.asarray(first[2])
    )  # the same request, the same bytes


def test_out_of_memory_is_one_line_naming_the_stage_and_the_knobs(tiny_t2i, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.2 GiB free"
        )

    monkeypatch.setattr(M.LongCatTransformer, "forward", oom)
    with pytest.raises(SystemExit) as stop:
        validate.main(
            [
                "--model",
                str(tiny_t2i),
                "--prompt",
                "x",
                "--steps",
                "2",
                "--resolution",
                "64x64",
                "--out",
                str(tmp_path / "o.png"),
            ]
        )
    message = str(stop.value)
    assert message.startswith(
        "error: out of GPU memory while sampling 64x64 (tried to allocate 2.00 gib"
    )
    assert "--quant int8" in message and "\n" not in message
    assert not (tmp_path / "o.png").exists()


def test_a_prompt_past_512_tokens_is_cut_with_one_warning(tiny_t2i, tmp_path):
    long = "a red fox" + " and" * 600
    proc = validate_cli(
        model=tiny_t2i, prompt=long, steps=1, resolution="64x64", out=tmp_path / "a.png"
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, proc.stderr  # once, though the text is encoded for CFG too
    assert "tokens, only the first 512 are used" in lines[0] and "a red fox" in lines[0], lines
    short = validate_cli(
        model=tiny_t2i, prompt="a red fox", steps=1, resolution="64x64", out=tmp_path / "b.png"
    )
    assert "warning:" not in short.stderr, short.stderr


def test_ctrl_c_exits_130(monkeypatch, capsys):
    """Catches sys.exit("interrupted"), which is rc 1: a script could not tell it from a failure."""

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(validate, "run", interrupted)
    with pytest.raises(SystemExit) as stop:
        validate.main(["--prompt", "x"])
    assert stop.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_flags_that_would_do_nothing_are_said(tiny_edit):
    """Each flag this run cannot use is one warning line, before any model loads. Catches a
    negative prompt or a preview interval silently ignored."""
    args = validate.parse_args(
        ["--prompt", "x", "--negative-prompt", "blurry", "--guidance", "1", "--port", "9000"]
        + ["--preview-every", "5", "--steps", "2", "--no-cfg-renorm"]
    )
    lines = validate.unused_flags(args, "edit")
    assert lines == [
        "--host, --port and --resident are for --serve only",
        "--negative-prompt is not used: --guidance 1 <= 1 is no CFG",
        "--cfg-renorm and --cfg-renorm-min are for text-to-image checkpoints only",
        "--preview-every 5 saves no preview in 2 steps",
    ], lines
    assert validate.unused_flags(validate.parse_args(["--prompt", "x"]), "edit") == []
    served = validate.parse_args(["--serve", "--prompt", "x"])
    assert validate.unused_flags(served, "t2i") == [
        "--prompt, --ref and --out are not used with --serve (the page asks)"
    ]


def test_a_flag_of_the_wrong_type_is_one_line():
    """Catches argparse's usage block (20 lines before the error)."""
    proc = run_script(ROOT / "validate.py", "--steps", "many", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: argument --steps/--validation_num_inference_steps: invalid int value: 'many' "
        "(python validate.py --help lists the flags)"
    ], proc.stderr
