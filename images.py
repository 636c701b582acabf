"""Images, read one way and drawn one way: reading a file into RGB (EXIF rotation, transparency,
size limits), turning it into the [-1, 1] tensor the VAE takes and back (diffusers'
`VaeImageProcessor` arithmetic, in diffusers/image_processor.py: `normalize`, `pt_to_numpy`,
`numpy_to_pil`), the centre crop into a bucket, and the pictures people look at: validation grids
with their captions and the loss curve (Pillow only).

Training images, validation references, `validate.py --ref` and the web page's uploads all come
through `load_rgb`, so the same file always gives the same latent. Imports no project file but
files.py.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps, UnidentifiedImageError

from files import write_atomic

# Refused before decoding: bigger files are scans or mistakes, and GBs as RGB.
MAX_PIXELS = 8192 * 8192
# What an output file's extension means to Pillow.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


# --------------------------------------------------------------------------------------------------
# Reading and converting

# Pillow raises DecompressionBombError past 2x its own limit (~179 MP) and only warns between 1x and
# 2x; our lower limit refuses those first, so no warning filter is needed (catch_warnings is not
# thread-safe anyway).
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
DEEP_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
TRANSPARENT = ("RGBA", "LA", "PA", "RGBa", "La")


def load_rgb(
    path: Path, data: bytes | None = None, max_pixels: int = MAX_PIXELS, key: str = ""
) -> Image.Image:
    """The image (from data if given, else read) fully decoded, EXIF-rotated, as 8-bit RGB with
    transparency composited on white. Raises ImageError naming the file (after `key`, e.g. "--ref")
    when it is unreadable, truncated or too large."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may set it; truncated files must fail
    try:
        with Image.open(io.BytesIO(data) if data else path) as img:
            if img.width * img.height > max_pixels:  # from the header, before decoding
                raise OSError(
                    f"{img.width}x{img.height} is over {max_pixels / 2**20:.0f} MP; downscale it"
                )
            img.load()  # decodes everything: raises on a truncated file
            img = ImageOps.exif_transpose(img)
        if img.mode in DEEP_GREY:  # Pillow's convert would clip 16-bit grey
            a = np.asarray(img, dtype=np.float64)
            scale = (
                257.0 if img.mode.startswith("I;16") or a.max() > 255 else 1.0
            )  # 65535 / 257 = 255
            img = Image.fromarray(np.clip(np.round(a / scale), 0, 255).astype(np.uint8), "L")
        if img.mode in TRANSPARENT or "transparency" in img.info:
            rgba = img.convert(
                "RGBA"
            )  # a plain convert("RGB") shows the colour hidden under clear pixels
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return img.convert("RGB")
    # ValueError: also a mode Pillow cannot convert to RGB
    except READ_ERRORS as e:
        why = "not an image Pillow can read" if isinstance(e, UnidentifiedImageError) else e
        if isinstance(e, Image.DecompressionBombError):  # Pillow's own limit struck first
            n = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(n.group(1)) / 2**20:.0f} MP" if n else "it"
            why = f"{size} is over {max_pixels / 2**20:.0f} MP; downscale it"
        raise ImageError(f"{key + ' ' if key else ''}{path}: cannot read image ({why})") from None


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1], with diffusers' VaeImageProcessor
    arithmetic."""
    x = torch.from_numpy(
        np.asarray(image.convert("RGB"), dtype=np.float32)[None] / 255.0
    )  # (1, H, W, 3)
    # (1, 3, H, W) viewed, not copied: channels-last in memory like diffusers' tensor, so the VAE's
    # convs pick the same kernels (in bf16 another memory layout rounds differently)
    return (2 * x - 1).permute(0, 3, 1, 2)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] in about [-1, 1] -> PIL image, rounded as diffusers does."""
    x = (x[0] / 2 + 0.5).clamp(0, 1).float().permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    return Image.fromarray((x * 255).round().astype(np.uint8))


def fit(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Cover the bucket (W, H) and crop the centre; width stays width."""
    return ImageOps.fit(img, bucket, Image.LANCZOS, centering=(0.5, 0.5))


# --------------------------------------------------------------------------------------------------
# Validation grids: the rows people look at, with their captions (Pillow only)


def font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def wrap(draw, text: str, width: float, face) -> list[str]:
    lines = []
    line = ""
    for word in text.split():
        if line and draw.textlength(f"{line} {word}", font=face) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines or [""]


def validation_grid(rows: list[tuple[str, list[tuple[str, object]]]]):
    """One row per validation prompt: its caption (prompt, step, seed, guidance) above, then
    labelled images (reference | previews | result), each at the result's size."""
    face = font(15)
    small = font(12)
    w, h = max((row[-1][1].size for _, row in rows), key=lambda s: s[0] * s[1])
    cols = max(len(row) for _, row in rows)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [wrap(probe, caption, cols * w - 12, face) for caption, _ in rows]
    heights = [20 * len(t) + 10 + 16 + h for t in texts]
    grid = Image.new("RGB", (cols * w, sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for (_, row), lines, height in zip(rows, texts, heights, strict=True):
        for i, line in enumerate(lines):
            draw.text((6, y + 5 + 20 * i), line, fill="black", font=face)
        top = y + 20 * len(lines) + 10
        for j, (label, image) in enumerate(row):
            draw.text((j * w + 4, top), label, fill=(90, 90, 90), font=small)
            grid.paste(image.resize((w, h)), (j * w, top + 16))
        y += height
    return grid


# --------------------------------------------------------------------------------------------------
# The loss curve, with its axes (Pillow only)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    span = (hi - lo) or abs(hi) or 1.0
    unit = 10 ** math.floor(math.log10(span / n))
    unit *= next(m for m in (1, 2, 5, 10) if span / (unit * m) <= n)
    first = math.ceil(lo / unit - 1e-9) * unit
    return [first + i * unit for i in range(int((hi - first) / unit + 1e-9) + 1)]


def plot_losses(rows: list[dict], png: Path) -> None:
    """loss.png: the loss at every step (light), its running mean (dark) on the left axis, the
    learning rate (orange) on the right axis, steps along the bottom."""
    if len(rows) < 2:
        return
    W, H = 900, 440  # the picture
    # margins around the plot area
    left = 74
    right = 78
    top = 44
    bottom = 46
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    lrs = [r["lr"] for r in rows]
    smooth = []
    acc = losses[0]
    for v in losses:
        acc = 0.9 * acc + 0.1 * v
        smooth.append(acc)
    pad = 0.05 * ((max(losses) - min(losses)) or abs(max(losses)) or 1.0)
    lo = min(losses) - pad
    hi = max(losses) + pad
    # headroom above the largest rate, so a constant rate is a line inside the plot, not its border
    lr_hi = 1.15 * max(lrs) or 1.0

    def x(s: float) -> float:
        return left + (s - steps[0]) / ((steps[-1] - steps[0]) or 1) * (W - left - right)

    def y(v: float, v0: float = lo, v1: float = hi) -> float:
        return H - bottom - (v - v0) / ((v1 - v0) or 1) * (H - top - bottom)

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    face = font(12)
    d.rectangle([left, top, W - right, H - bottom], outline=(120, 120, 120))
    for s in nice_ticks(steps[0], steps[-1], 8):
        d.line([(x(s), H - bottom), (x(s), H - bottom + 4)], fill="black")
        d.text((x(s) - 10, H - bottom + 6), f"{s:g}", fill="black", font=face)
    for v in nice_ticks(lo, hi, 6):
        d.line([(left - 4, y(v)), (W - right, y(v))], fill=(225, 225, 225))
        d.text((4, y(v) - 7), f"{v:.4g}", fill="black", font=face)
    for v in nice_ticks(0.0, lr_hi, 5):
        d.text((W - right + 6, y(v, 0.0, lr_hi) - 7), f"{v:.2g}", fill=(200, 110, 0), font=face)
    raw = [(x(s), y(v)) for s, v in zip(steps, losses, strict=True)]
    mean = [(x(s), y(v)) for s, v in zip(steps, smooth, strict=True)]
    rate = [(x(s), y(v, 0.0, lr_hi)) for s, v in zip(steps, lrs, strict=True)]
    d.line(raw, fill=(170, 190, 230), width=1)
    d.line(mean, fill=(20, 60, 160), width=2)
    d.line(rate, fill=(230, 140, 20), width=1)
    title = f"loss {losses[0]:.4f} -> {smooth[-1]:.4f} (running mean), steps {steps[0]}-{steps[-1]}"
    d.text((left, 8), title, fill="black", font=face)
    d.text((4, top - 16), "loss", fill=(20, 60, 160), font=face)  # the left axis
    d.text(
        (W - right - 40, top - 16), "learning rate", fill=(200, 110, 0), font=face
    )  # the right axis
    d.text((W // 2 - 14, H - 20), "step", fill="black", font=face)
    write_atomic(png, lambda tmp: img.save(tmp, format="PNG"), "the loss curve ")
