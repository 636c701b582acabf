"""Edit an image (or, on a `final`/`dev` checkpoint, generate one) with LongCat-Image, optionally with LoRAs
and int8/fp8 weights:

    python validate.py --ref photo.png --prompt "make the sky 'purple'"
    python validate.py --model meituan-longcat/LongCat-Image --prompt "a cat holding a sign that says 'hi'"

The stages run one at a time and each is freed before the next: text encoder (prompt and negative prompt)
-> transformer (denoising) -> VAE (decoding), so peak GPU memory is the largest stage, not the sum. The
numbers follow diffusers' LongCatImageEditPipeline / LongCatImagePipeline: same seed, same image (tests/).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

import model as M

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="meituan-longcat/LongCat-Image-Edit", help="checkpoint folder or hub id"
    )
    p.add_argument("--ref", help="the image to edit (edit checkpoints); leave out for text-to-image")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--guidance", type=float, default=4.5, help="CFG scale; <= 1 turns CFG off")
    p.add_argument(
        "--resolution", help="WxH, multiples of 16 (edit: ~1 MP at the reference's aspect; t2i: 1024x1024)"
    )
    p.add_argument("--out", help="output PNG (default: the next free edit-NNNN.png / t2i-NNNN.png here)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 on CUDA/MPS, float32 on CPU")
    p.add_argument("--device", help="default cuda, then mps, then cpu")
    p.add_argument(
        "--cfg-renorm", action=argparse.BooleanOptionalAction, default=True, help="t2i only (edit never)"
    )
    p.add_argument("--cfg-renorm-min", type=float, default=0.0)
    p.add_argument("--preview-every", type=int, default=0, help="also save the decoded image every N steps")
    p.add_argument("--lora", action="append", default=[], help="a LoRA .safetensors (repeatable)")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--quant", default="none", help="transformer weights: none | int8 | fp8")
    p.add_argument("--text-encoder-quant", default="none", help="text encoder weights: none | int8 | fp8")
    return p.parse_args(argv)


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--resolution {text!r}: expected WxH, e.g. 1024x768") from None
    if w % 16 or h % 16 or w <= 0 or h <= 0:
        raise ValueError(
            f"--resolution {text}: width and height must be positive multiples of 16 "
            f"(e.g. {max(w // 16 * 16, 16)}x{max(h // 16 * 16, 16)})"
        )
    return w, h


def next_free(stem: str) -> Path:
    i = 0
    while Path(f"{stem}-{i:04d}.png").exists():
        i += 1
    return Path(f"{stem}-{i:04d}.png")


def free(*_):
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quantizer(mode: str, flag: str, targets: str):
    """The `convert` hook that quantizes a model while it loads, or None for full precision."""
    import quant

    try:
        mode = quant.normalize_mode(mode)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    if mode == "none":
        return None
    return lambda m: quant.quantize_model(m, mode, targets=getattr(quant, targets))


def run(args: argparse.Namespace) -> Path:
    from PIL import Image, UnidentifiedImageError

    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    path = M.resolve_checkpoint(args.model)
    flavour = M.read_flavour(path)
    if flavour == "edit" and not args.ref:
        raise ValueError(f"{args.model} is an edit checkpoint: give the image to edit with --ref")
    if flavour == "t2i" and args.ref:
        raise ValueError(f"{args.model} is a text-to-image checkpoint: --ref needs LongCat-Image-Edit")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be at least 1")
    te_convert = quantizer(args.text_encoder_quant, "--text-encoder-quant", "TEXT_ENCODER_TARGETS")
    convert = quantizer(args.quant, "--quant", "DEFAULT_TARGETS")
    for f in args.lora:  # before any model loads: a typo should not cost a text-encoder pass
        if not Path(f).exists():
            raise ValueError(f"--lora {f}: no such file")
    ref = None
    if args.ref:
        try:
            ref = Image.open(args.ref)
            ref.load()
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"--ref {args.ref}: cannot read the image ({e})") from None
        ref = ref.convert("RGB")
        width, height = parse_size(args.resolution) if args.resolution else M.edit_size(*ref.size)
        ref = ref.resize((width, height), Image.LANCZOS)
    else:
        width, height = parse_size(args.resolution) if args.resolution else (1024, 1024)
    out = Path(args.out) if args.out else next_free("edit" if ref else "t2i")
    use_cfg = args.guidance > 1

    # Stage 1: the prompts (the negative prompt sees the same reference image).
    te = M.load_text_encoder(path, dtype, device, convert=te_convert)
    txt = te.encode(args.prompt, ref)
    neg = te.encode(args.negative_prompt, ref) if use_cfg else None
    del te
    free()

    # Stage 2: the reference latent, then the transformer denoises.
    vae = M.load_vae(path, dtype, device)
    ref_latent = M.to_latent(vae, M.pil_to_tensor(ref).to(device)) if ref is not None else None
    transformer = M.load_transformer(path, dtype, device, convert=convert)
    if args.lora:
        import lora

        for f in args.lora:  # each file is merged in, so several LoRAs (of any ranks) stack
            lora.load_lora(transformer, f, scale=args.lora_scale)
            if len(args.lora) > 1:
                lora.merge_and_unload(transformer)
    # The edit pipeline draws its noise in the model dtype, the t2i pipeline in float32.
    noise = M.initial_noise(args.seed, height, width, dtype, None if ref is not None else torch.float32).to(
        device
    )
    sigmas = M.schedule(args.steps, (height // 16) * (width // 16), M.read_scheduler(path))

    def preview(i, latent):
        if args.preview_every and (i + 1) % args.preview_every == 0 and i + 1 < args.steps:
            with torch.no_grad():
                M.tensor_to_pil(M.from_latent(vae, latent)).save(
                    out.with_name(f"{out.stem}-step{i + 1:03d}.png")
                )

    latent = M.sample(transformer, noise, txt, neg, sigmas, args.guidance, ref=ref_latent,
                      cfg_renorm=args.cfg_renorm and ref is None, cfg_renorm_min=args.cfg_renorm_min,
                      callback=preview)  # fmt: skip
    del transformer
    free()

    # Stage 3: decode.
    with torch.no_grad():
        image = M.tensor_to_pil(M.from_latent(vae, latent))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({width}x{height}, {args.steps} steps, guidance {args.guidance}, seed {args.seed})")
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (
        ValueError,
        FileNotFoundError,
    ) as e:  # CheckpointError is a ValueError: a message, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
