"""Edit an image (or, on a `final`/`dev` checkpoint, generate one) with LongCat-Image: the command
line over pipeline.py.

    python validate.py --ref photo.png --prompt "make the sky 'purple'"
    python validate.py --model meituan-longcat/LongCat-Image --prompt "a sign that says 'hi'"
    python validate.py --serve                         # the edit web page on http://127.0.0.1:7860

Every flag and file is checked before the first model loads (a LoRA file against the transformer's
names and shapes, the references, the device, the output folder), in the order a user would fix
them; then pipeline.render() makes the image and it is written without replacing anything unless
--overwrite says so. Same seed, same image as diffusers' pipelines (tests/).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from functools import partial
from pathlib import Path

import torch

import config
import images
import lora
import model as M
import pipeline
import quant
import serve
from files import remove_stale_temporaries, write_atomic, write_new


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag as one `error:` line (not the 20-line usage block)."""

    def error(self, message: str):
        print(f"error: {message} (python validate.py --help lists the flags)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="checkpoint folder, hub id, or tiny / tiny-t2i")
    p.add_argument(
        "--model_flavour",
        "--model-flavour",
        choices=sorted(config.FLAVOUR_MODELS),
        help="the released checkpoint of this flavour, when --model is not given (default edit)",
    )
    p.add_argument(
        "--ref",
        action="append",
        default=[],
        help="the image to edit (edit checkpoints; repeat for several references)",
    )
    p.add_argument("--prompt", help="the instruction (edit) or the description (t2i)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--steps", "--validation_num_inference_steps", dest="steps", type=int, default=40
    )
    p.add_argument(
        "--guidance",
        "--validation_guidance",
        dest="guidance",
        type=float,
        default=4.5,
        help="CFG scale; <= 1 turns CFG off",
    )
    p.add_argument(
        "--resolution",
        "--validation_resolution",
        dest="resolution",
        help="WxH, multiples of 16 (edit: ~1 MP at the reference's aspect; t2i: 1024x1024)",
    )
    p.add_argument(
        "--out", help="output image (default: the next free edit-NNNN.png / t2i-NNNN.png)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its previews)")
    p.add_argument(
        "--dtype", choices=sorted(config.DTYPES), help="default bfloat16 on a GPU, float32 on CPU"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument(
        "--attention", default="auto", help=f"SDPA kernels: {', '.join(M.ATTENTION_CHOICES)}"
    )
    p.add_argument(
        "--cfg-renorm", action=argparse.BooleanOptionalAction, default=True, help="t2i only"
    )
    p.add_argument("--cfg-renorm-min", type=float, default=0.0)
    p.add_argument("--preview-every", type=int, default=0, help="also save every N steps' image")
    p.add_argument("--lora", action="append", default=[], help="an adapter file (repeatable)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="0 gives the base model exactly")
    p.add_argument("--quant", default="none", help="transformer: none | int8 | fp8 | fp8-compute")
    p.add_argument("--text-encoder-quant", default="none", help="text encoder: none | int8 | fp8")
    p.add_argument("--offload-blocks", type=int, default=0, help="stream N blocks from CPU memory")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument(
        "--serve", action="store_true", help="serve the edit web page instead (serve.py)"
    )
    p.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on")
    p.add_argument("--port", type=int, default=7860, help="--serve: the port")
    p.add_argument("--resident", action="store_true", help="--serve: keep every model on the GPU")
    return p.parse_args(argv)


def settings(args: argparse.Namespace, size: tuple[int, int] | None) -> pipeline.Settings:
    """The flags' generation settings, checked against pipeline.LIMITS, naming the flag."""
    s = pipeline.Settings(
        size=size,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        negative=args.negative_prompt,
        cfg_renorm=args.cfg_renorm,
        cfg_renorm_min=args.cfg_renorm_min,
        preview_every=args.preview_every,
    )
    s.check(
        {
            "seed": "--seed",
            "steps": "--steps",
            "guidance": "--guidance",
            "cfg_renorm_min": "--cfg-renorm-min",
            "preview_every": "--preview-every",
            "size": "--resolution",
        }
    )
    return s


def check_numbers(args: argparse.Namespace) -> None:
    """The flags that are not generation settings."""
    if not math.isfinite(args.lora_scale):
        raise ValueError(f"--lora-scale {args.lora_scale}: must be a finite number")
    if not -100 <= args.lora_scale <= 100:
        raise ValueError(f"--lora-scale {args.lora_scale}: must be between -100 and 100")
    if not 0 <= args.offload_blocks <= 1000:
        raise ValueError(f"--offload-blocks {args.offload_blocks}: must be between 0 and 1000")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be between 1 and 65535")


def check_loras(files: list[str], ckpt: Path) -> M.TransformerConfig:
    """Each --lora file read and held to the transformer's names and shapes (a meta-device model).
    Returns the transformer's config."""
    transformer_config = M.read_transformer_config(ckpt)
    with torch.device("meta"):
        skeleton = M.LongCatTransformer(transformer_config)
    for f in files:
        if not Path(f).exists():  # a folder is read as a training output_dir
            raise ValueError(f"--lora {f}: no such file or folder")
        try:
            lora.check_lora(skeleton, *lora.read_lora(f))
        except ValueError as e:
            raise ValueError(f"--lora {e}") from None
    return transformer_config


def output_path(out: str | None, stem: str, overwrite: bool, key: str = "--out") -> Path:
    """Where the image goes: --out (never replaced without --overwrite) or the next free
    STEM-NNNN.png; its folder is made and checked to be writable now, not after the whole run.
    `key` names the file in messages (--out, or a preview of it)."""
    if out is not None and not out.strip():
        raise ValueError(f"{key} is empty: give a file name, or leave --out out")
    path = Path(out) if out else next_free(stem)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"{key} {path}: use a .png, .jpg or .webp file name")
    if path.is_dir():
        raise ValueError(f"{key} {path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ValueError(
            f"{key} {path}: already exists; pass --overwrite to replace it, or another --out"
        )
    if blocked := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
        raise ValueError(f"{key} {path}: {blocked} is a file, not a folder; choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{key} {path}: cannot write there ({e.strerror or e})") from None
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (another spelling, a link), as far as can be told now."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def next_free(stem: str) -> Path:
    i = 0
    while Path(f"{stem}-{i:04d}.png").exists():
        i += 1
    return Path(f"{stem}-{i:04d}.png")


def save_image(image, path: Path, overwrite: bool) -> Path:
    """Write the image to `path` (a full disk leaves no partial file). Without --overwrite a file
    that appeared meanwhile is never replaced: the next free name is taken instead."""
    image_format = images.FORMATS[path.suffix.lower()]

    def write(tmp: Path) -> None:
        image.save(tmp, format=image_format)

    if overwrite:
        write_atomic(path, write, "the image ")
        return path
    while True:
        try:
            write_new(path, write, "the image ")
            return path
        except FileExistsError:
            path = next_free(re.sub(r"-\d{4}$", "", path.with_suffix("").as_posix()))


def prepare(args: argparse.Namespace) -> dict:
    """Everything that can be checked without a model, in the order a user would fix it."""
    check_numbers(args)
    size = pipeline.parse_size(args.resolution) if args.resolution else None
    s = settings(args, size)
    device = config.pick_device(args.device)
    dtype = config.DTYPES[args.dtype] if args.dtype else config.model_dtype(device)
    for flag, mode in (("--quant", args.quant), ("--text-encoder-quant", args.text_encoder_quant)):
        try:
            mode = quant.normalize_mode(mode, compute=flag == "--quant")
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    try:
        quant.check_device(quant.normalize_mode(args.quant), device)
    except ValueError as e:
        raise ValueError(f"--quant: {e}") from None
    if args.model and args.model_flavour:
        raise ValueError("--model and --model_flavour: give one (a flavour names a checkpoint)")
    name = args.model or config.FLAVOUR_MODELS[args.model_flavour or "edit"]
    ckpt = config.resolve_checkpoint(name)
    flavour = M.read_flavour(ckpt)
    if not args.serve and not (args.prompt or "").strip():
        raise ValueError("--prompt is required (or --serve for the web page)")
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        try:
            (text or "").encode("utf-8")  # bytes the shell could not decode become surrogates
        except UnicodeEncodeError:
            raise ValueError(
                f"{flag}: not valid UTF-8 text; check the terminal's encoding"
            ) from None
    if not args.serve and flavour == "edit" and not args.ref:
        raise ValueError(f"{name} is an edit checkpoint: give the image to edit with --ref")
    if flavour == "t2i" and args.ref:
        raise ValueError(f"{name} is a text-to-image checkpoint: --ref needs LongCat-Image-Edit")
    transformer_config = check_loras(args.lora, ckpt)
    blocks = transformer_config.num_layers + transformer_config.num_single_layers
    if args.offload_blocks > blocks:
        raise ValueError(
            f"--offload-blocks {args.offload_blocks}: the transformer has {blocks} blocks"
        )
    head_dim = transformer_config.attention_head_dim
    config.check_attention(args.attention, device, dtype, head_dim, grad=False, key="--attention")
    if args.attention == "cudnn":
        print(f"warning: --attention cudnn: {config.CUDNN_NOTE}", file=sys.stderr)
    for line in unused_flags(args, flavour):
        print(f"warning: {line}", file=sys.stderr)
    refs = [images.load_rgb(Path(r), key="--ref") for r in args.ref]
    out = None
    if not args.serve:
        out = output_path(args.out, "edit" if refs else "t2i", args.overwrite)
    if out is not None:  # what a validate.py killed while writing here left (a dead PID's)
        for leftover in remove_stale_temporaries(out.parent):
            print(f"removed {leftover}, left by a killed run", file=sys.stderr)
    written = [out] if out is not None else []
    if out is not None and args.preview_every:
        for step in range(args.preview_every, args.steps, args.preview_every):
            preview = preview_path(out, step)
            written.append(output_path(str(preview), "", args.overwrite, "--out's preview"))
    for path in written:  # --overwrite replaces an image, never the one being edited
        if ref := next((r for r in args.ref if same_file(Path(r), path)), None):
            raise ValueError(
                f"--out {path} is the reference --ref {ref}: write the edit elsewhere (the "
                "reference is never replaced)"
            )
    return {
        "device": device,
        "dtype": dtype,
        "ckpt": ckpt,
        "flavour": flavour,
        "refs": refs,
        "settings": s,
        "out": out,
    }


def unused_flags(args: argparse.Namespace, flavour: str) -> list[str]:
    """Flags given that this run does not use: each is said, as a flag that does nothing silently
    looks like one that worked."""
    lines = []
    if args.serve and (args.prompt or args.ref or args.out):
        lines.append("--prompt, --ref and --out are not used with --serve (the page asks)")
    if not args.serve and (args.host != "127.0.0.1" or args.port != 7860 or args.resident):
        lines.append("--host, --port and --resident are for --serve only")
    if args.negative_prompt and args.guidance <= 1:
        lines.append(f"--negative-prompt is not used: --guidance {args.guidance:g} <= 1 is no CFG")
    if flavour == "edit" and (not args.cfg_renorm or args.cfg_renorm_min):
        lines.append("--cfg-renorm and --cfg-renorm-min are for text-to-image checkpoints only")
    if 0 < args.preview_every >= args.steps and not args.serve:
        lines.append(f"--preview-every {args.preview_every} saves no preview in {args.steps} steps")
    return lines


def preview_path(out: Path, step: int) -> Path:
    return out.with_name(f"{out.stem}-step{step:03d}.png")


def run(args: argparse.Namespace) -> Path | None:
    plan = prepare(args)
    M.set_attention_backend(args.attention)
    options = pipeline.LoadOptions(
        quant=args.quant,
        text_encoder_quant=args.text_encoder_quant,
        loras=tuple(args.lora),
        lora_scale=args.lora_scale,
        offload_blocks=args.offload_blocks,
        compile=args.compile,
    )
    models = pipeline.Models(
        plan["ckpt"],
        plan["device"],
        plan["dtype"],
        options,
        keep=args.serve,
        resident=args.resident,
    )
    s = plan["settings"]
    if args.serve:
        render = partial(pipeline.render, models)
        return serve.serve(render, s, plan["flavour"], args.host, args.port)
    image, previews = pipeline.render(models, args.prompt, plan["refs"] or None, s)
    out = plan["out"]
    for step, preview in previews:
        save_image(preview, preview_path(out, step), args.overwrite)
    out = save_image(image, out, args.overwrite)
    w, h = image.size
    print(f"wrote {out} ({w}x{h}, {args.steps} steps, guidance {args.guidance}, seed {args.seed})")
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    # CheckpointError, ImageError, OutOfMemory, WriteError are ValueErrors: a message, not a
    # traceback
    except (ValueError, OSError) as e:
        pipeline.close_progress_bars()
        sys.exit("error: " + " ".join(str(e).split()))
    except KeyboardInterrupt:  # 130, as a shell reports Ctrl-C: a script can tell it from a failure
        pipeline.close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
