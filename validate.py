"""Edit an image (or, on a `final`/`dev` checkpoint, generate one) with LongCat-Image: the pipeline by hand.

    python validate.py --ref photo.png --prompt "make the sky 'purple'"
    python validate.py --model meituan-longcat/LongCat-Image --prompt "a cat holding a sign that says 'hi'"
    python validate.py --serve                         # the edit web page on http://127.0.0.1:7860

What diffusers' LongCatImageEditPipeline / LongCatImagePipeline compute, written out, in reading order:
Qwen2.5-VL prompt encoding with LongCat's chat templates (SPEC §4), the Euler sampler with CFG (§5),
`generate()` (embeddings -> image), which this CLI, the web page (serve.py) and training's validation share,
`Models` (each model read from disk once; the text encoder never shares the GPU with the others, so peak GPU
memory is the largest stage, not the sum), `render()` (prompt -> image), validation grids, and the command
line, which checks every input before the first model loads. Same seed, same image as diffusers (tests/).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

import config
import data
import model as M

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}
KNOBS = "--quant int8, --text-encoder-quant int8, --offload-blocks N or a smaller --resolution"


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
    # longest mark first: each mark is a prefix of the longer ones
    hidden = [(w, "longcat_$##$_longcat" * (i + 1)) for i, w in reversed(list(enumerate(words)))]
    for w, mark in hidden:
        prompt = prompt.replace(w, mark)
    quoted = "|".join(re.escape(a) + "[^" + re.escape(a + b) + "]*?" + re.escape(b) for a, b in QUOTES)
    spans = []
    for part in re.split(f"({quoted})", prompt):
        for w, mark in hidden:
            part = part.replace(mark, w)
        if part:
            spans.append((part, re.match(quoted, part) is not None))
    return spans


class TextEncoder:
    """Qwen2.5-VL-7B as LongCat uses it: the chat template around the prompt, the last hidden state kept for
    the prompt's 512 positions (t2i) or for the reference image's tokens and the prompt (edit)."""

    def __init__(self, model, tokenizer, image_processor):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenize(self, prompt: str) -> list[int]:
        """Quoted text goes one character at a time (so the model can spell it), the rest normally; <= 512."""
        out = []
        for text, quoted in split_quotes(prompt):
            out += [i for ch in text for i in self.ids(ch)] if quoted else self.ids(text)
        return out[:MAX_PROMPT_TOKENS]

    @torch.no_grad()
    def encode(self, prompt: str, image=None) -> torch.Tensor:
        """Prompt (and, for editing, the reference PIL image at the output size) -> embeddings [1, L, D].
        t2i: L = 512. Edit: the reference goes to Qwen at half size; L = 2 + N_vl + 512."""
        ids = self.tokenize(prompt)
        pads = MAX_PROMPT_TOKENS - len(ids)
        prompt_ids, prompt_mask = ids + [self.tokenizer.pad_token_id] * pads, [1] * len(ids) + [0] * pads
        param = next(self.model.parameters())
        extra = {}
        if image is None:
            prefix = self.ids(T2I_PREFIX)
            start = len(prefix)
        else:
            from PIL import Image

            half = image.convert("RGB").resize((image.width // 2, image.height // 2), Image.LANCZOS)
            vl = self.image_processor(images=half, return_tensors="pt")
            n_vl = int(vl["image_grid_thw"].prod()) // self.image_processor.merge_size**2
            prefix = self.ids(EDIT_PREFIX.replace("<|image_pad|>", "<|image_pad|>" * n_vl))
            start = prefix.index(self.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
            extra = {
                "pixel_values": vl["pixel_values"].to(param.device, param.dtype),
                "image_grid_thw": vl["image_grid_thw"].to(param.device),
            }
        suffix = self.ids(SUFFIX)
        input_ids = torch.tensor([prefix + prompt_ids + suffix], device=param.device)
        mask = torch.tensor([[1] * len(prefix) + prompt_mask + [1] * len(suffix)], device=param.device)
        # last_hidden_state comes after the final norm, as the pipelines' hidden_states[-1]
        out = self.model(input_ids=input_ids, attention_mask=mask, **extra).last_hidden_state
        return out[:, start : -len(suffix)]


def load_text_encoder(path: Path, dtype=torch.bfloat16, device="cpu", convert=None) -> TextEncoder:
    """Qwen2.5-VL from text_encoder/, with its tokenizer/ and text_processor/ (the image processor).
    transformers maps legacy and new tensor names; the LM head is dropped (only hidden states are used, 1 GB);
    the tokenizer pads on the right, as the pipelines assume; the image processor is the PIL one (no
    torchvision). The model loads on the CPU (a device_map would need accelerate), `convert(model)`
    (quantization) runs there, then it moves to `device`."""
    import transformers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    tokenizer.padding_side = "right"
    proc_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    procs = [
        path / d
        for d in ("text_processor", "tokenizer", "text_encoder")
        if (path / d / "preprocessor_config.json").exists()
    ]
    if not procs:
        raise M.CheckpointError(f"{path}: text_processor/preprocessor_config.json is missing")
    for f in M.weight_files(path / "text_encoder"):
        M.read_header(f)  # a truncated or corrupt file is named here, not deep inside transformers
    backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder", dtype=dtype).model
    if convert is not None:
        convert(backbone)
    backbone = backbone.to(device).eval().requires_grad_(False)
    return TextEncoder(backbone, tokenizer, proc_cls.from_pretrained(procs[0]))


# ----------------------------------------------------------------------------------------------------------
# The sampler (SPEC §3, §5)


def initial_noise(seed: int, height: int, width: int, dtype: torch.dtype, draw_dtype=None) -> torch.Tensor:
    """The pipelines' starting noise [1, 16, H/8, W/8], drawn on the CPU so a seed means the same everywhere.
    The edit pipeline draws in its own dtype, the t2i pipeline in float32 then casts (draw_dtype)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, 16, height // 8, width // 8), generator=g, dtype=draw_dtype or dtype).to(dtype)


def guide(v: torch.Tensor, v_neg: torch.Tensor, scale: float, renorm_min: float | None) -> torch.Tensor:
    """Classifier-free guidance; with renorm (renorm_min not None) each token is rescaled so the guided
    velocity is never longer than the conditional one (the t2i pipeline's cfg renorm)."""
    guided = v_neg + scale * (v - v_neg)
    if renorm_min is None:
        return guided
    s = v.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)
    return guided * s.clamp(renorm_min, 1)


@torch.no_grad()
def sample(
    transformer, noise, txt, neg, sigmas, guidance, ref=None, renorm_min=None, callback=None, progress=True
):
    """Euler sampler over the flow: noise [1, 16, h, w] normalised latent -> latent [1, 16, h, w].

    txt / neg [1, L, D] prompt embeddings (neg used when guidance > 1), ref [1, 16, h, w] the clean
    reference latent for editing (its tokens ride along with modality 2; only target tokens are kept).
    callback(i, latent [1, 16, h, w]) is called after each step.
    """
    from tqdm.auto import tqdm

    _, _, h, w = noise.shape
    dev, dtype = noise.device, noise.dtype
    x = M.pack(noise)  # (1, N, 64)
    n = x.shape[1]
    ref_tokens = M.pack(ref.to(dtype)) if ref is not None else None
    conds = [txt, neg] if guidance > 1 and neg is not None else [txt]
    ids = []
    for c in conds:
        img = M.image_ids(h // 2, w // 2, c.shape[1], 1, dev)
        if ref is not None:
            img = torch.cat([img, M.image_ids(h // 2, w // 2, c.shape[1], 2, dev)])  # (2N, 3)
        ids.append((img, M.text_ids(c.shape[1], dev)))
    for i in tqdm(
        range(len(sigmas) - 1), desc="sampling", disable=not progress, leave=False, file=sys.stdout
    ):
        # diffusers hands the model (sigma * 1000 in the model dtype) / 1000: match it for bit parity.
        t = ((sigmas[i] * 1000).to(dtype) / 1000).expand(1).to(dev)
        inp = x if ref_tokens is None else torch.cat([x, ref_tokens], dim=1)  # (1, N [+ N], 64)
        v, *v_neg = (transformer(inp, c, t, *pos)[:, :n] for c, pos in zip(conds, ids, strict=True))
        if v_neg:
            v = guide(v, v_neg[0], guidance, renorm_min)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]).to(dev) * v).to(v.dtype)  # Euler, in float32
        if callback is not None:
            callback(i, M.unpack(x, h, w))
    return M.unpack(x, h, w)


def edit_size(width: int, height: int, area: int = 1024 * 1024) -> tuple[int, int]:
    """The edit pipeline's output size: ~area pixels at the input's aspect ratio, sides rounded up to 16."""
    w = math.sqrt(area * width / height)
    h = w / (width / height)
    return int(-(-w // 16) * 16), int(-(-h // 16) * 16)


@dataclass
class Settings:
    """What an image depends on besides the models and the prompt: validate.py's flags, the web page's form,
    training's validation_* keys. Defaults are the seed's validation values."""

    size: tuple[int, int] | None = None  # (W, H); None: ~1 MP at the reference's aspect (edit), 1024² (t2i)
    seed: int = 0
    steps: int = 40
    guidance: float = 4.5  # <= 1: no CFG
    negative: str = ""
    cfg_renorm: bool = True  # t2i only; the edit pipeline never renormalises
    cfg_renorm_min: float = 0.0
    preview_every: int = 0  # also decode the latent every N steps


@torch.no_grad()
def generate(transformer, vae, txt, neg, sched, s: Settings, ref_latent=None, on_step=None, progress=True):
    """Prompt embeddings [1, L, D] (neg: None without CFG) -> (image, [(step, preview image), ...]).

    s.size (W, H) must be set; ref_latent [1, 16, H/8, W/8] for editing. The noise comes from s.seed on the
    CPU, so the training RNG and other devices are untouched. on_step(step, steps, preview image or None)
    reports progress. A non-finite result is an error, never a black picture."""
    (w, h), param = s.size, transformer.x_embedder.weight
    # The edit pipeline draws its noise in the model dtype, the t2i pipeline in float32.
    noise = initial_noise(s.seed, h, w, param.dtype, None if ref_latent is not None else torch.float32)
    sigmas = M.schedule(s.steps, (h // 16) * (w // 16), sched)
    renorm_min = s.cfg_renorm_min if s.cfg_renorm and ref_latent is None else None
    previews = []

    def step_done(i: int, latent: torch.Tensor) -> None:
        image = None
        if s.preview_every and (i + 1) % s.preview_every == 0 and i + 1 < s.steps:
            image = data.tensor_to_pil(M.from_latent(vae, latent))
            previews.append((i + 1, image))
        if on_step is not None:
            on_step(i + 1, s.steps, image)

    txt, neg = txt.to(param), None if neg is None else neg.to(param)
    with stage(f"sampling {w}x{h}"):
        z = sample(
            transformer,
            noise.to(param.device),
            txt,
            neg,
            sigmas,
            s.guidance,
            ref_latent,
            renorm_min,
            step_done,
            progress,
        )
    if not torch.isfinite(z).all():
        raise ValueError(
            "the sampled image is not finite (NaN or inf): a LoRA or --lora-scale that breaks the model, "
            "or float16 overflow (try --dtype bfloat16)"
        )
    with stage(f"decoding {w}x{h}"):
        return data.tensor_to_pil(M.from_latent(vae, z)), previews


# ----------------------------------------------------------------------------------------------------------
# Models loaded once, moved as the stages need them; out-of-memory as a message


class OutOfMemory(ValueError):
    """A stage ran out of GPU memory; the message names it, the allocation and the knobs that lower memory."""


@contextmanager
def stage(what: str, knobs: str = KNOBS):
    """Turn a CUDA out-of-memory error inside the block into one line naming `what` was being done."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        tried = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", str(e))
        detail = tried.group(0).lower() if tried else "no detail"
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            detail += f"; {torch.cuda.memory_allocated() / 2**30:.1f} of {total / 2**30:.1f} GiB in use"
        raise OutOfMemory(f"out of GPU memory while {what} ({detail}); lower memory with {knobs}") from None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quantizer(mode: str, targets: str = "DEFAULT_TARGETS"):
    """The `convert` hook that quantizes a model while it loads (quant.py), or None for full precision."""
    import quant

    mode = quant.normalize_mode(mode)
    return (
        None if mode == "none" else partial(quant.quantize_model, mode=mode, targets=getattr(quant, targets))
    )


@dataclass
class Weights:
    """How the models are read: validate.py's --quant, --text-encoder-quant, --lora, --lora-scale,
    --offload-blocks and --compile (train.py sets only the text encoder's precision)."""

    quant: str = "none"
    te_quant: str = "none"
    loras: tuple = ()
    lora_scale: float = 1.0
    offload_blocks: int = 0
    compile: bool = False


class Models:
    """A checkpoint's text encoder, VAE and transformer, each read from disk at its first use and then kept
    (`loads` counts the reads). Asking for the text encoder moves the other two to the CPU; asking for
    either of them moves the text encoder there, or frees it with keep=False (the one-shot CLI): the text
    encoder never shares the GPU. `resident=True` leaves everything on the device."""

    def __init__(
        self, ckpt: Path, device, dtype, weights: Weights, keep: bool = True, resident: bool = False
    ):
        self.ckpt, self.device, self.dtype, self.weights = ckpt, torch.device(device), dtype, weights
        self.keep, self.resident = keep, resident
        self.flavour, self.sched = config.read_flavour(ckpt), config.read_scheduler(ckpt)
        self.built: dict[str, object] = {}
        self.loads: Counter = Counter()

    def text_encoder(self) -> TextEncoder:
        return self._get("text_encoder", ("vae", "transformer"))

    def vae(self) -> M.VAE:
        return self._get("vae", ("text_encoder",))

    def transformer(self) -> M.LongCatTransformer:
        return self._get("transformer", ("text_encoder",))

    def drop(self, name: str) -> None:
        """Free one model for good (training drops the text encoder once everything is encoded)."""
        if self.built.pop(name, None) is not None:
            free_memory()

    def park(self) -> None:
        """Everything to the CPU (training parks the VAE between validations)."""
        for name in list(self.built):
            self._move(name, torch.device("cpu"))

    def _get(self, name: str, others: tuple[str, ...]):
        for other in others if not self.resident else ():
            if other in self.built and self.keep:
                self._move(other, torch.device("cpu"))
            elif other in self.built:
                self.drop(other)
        if name not in self.built:
            with stage(f"loading the {name.replace('_', ' ')}"):
                self.built[name] = getattr(self, f"_load_{name}")()
            self.loads[name] += 1
        self._move(name, self.device)
        return self.built[name]

    def _move(self, name: str, device: torch.device) -> None:
        m = self.built[name]
        m = m.model if isinstance(m, TextEncoder) else m
        if next(m.parameters()).device != device:
            with stage(f"moving the {name.replace('_', ' ')} to {device}"):
                m.to(device)
            free_memory()

    def _load_text_encoder(self) -> TextEncoder:
        convert = quantizer(self.weights.te_quant, "TEXT_ENCODER_TARGETS")
        return load_text_encoder(self.ckpt, self.dtype, self.device, convert=convert)

    def _load_vae(self) -> M.VAE:
        return M.load_vae(self.ckpt, self.dtype, self.device)

    def _load_transformer(self) -> M.LongCatTransformer:
        import lora
        import quant

        w = self.weights
        where = "cpu" if w.offload_blocks else self.device  # offloaded blocks stay in (pinned) CPU memory
        transformer = M.load_transformer(self.ckpt, self.dtype, where, convert=quantizer(w.quant))
        for f in w.loras:  # each file is merged in, so several LoRAs (of any ranks) stack
            lora.load_lora(transformer, f, scale=w.lora_scale)
            if len(w.loras) > 1:
                lora.merge_and_unload(transformer)
        if w.offload_blocks:
            blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
            transformer.offload = quant.offload_blocks(blocks, w.offload_blocks, self.device)
        if w.compile:
            transformer.compile_blocks()
        return transformer


def render(models: Models, prompt: str, ref, s: Settings, on_step=None, progress=True):
    """The whole pipeline on a Models: prompt (+ the reference PIL image to edit) -> (image, previews)."""
    from PIL import Image

    size = s.size or (edit_size(*ref.size) if ref is not None else (1024, 1024))
    ref = ref.resize(size, Image.LANCZOS) if ref is not None else None
    with stage("encoding the prompt"):
        te = models.text_encoder()
        # the negative prompt sees the same reference image
        txt, neg = te.encode(prompt, ref), te.encode(s.negative, ref) if s.guidance > 1 else None
    vae = models.vae()
    ref_latent = None
    if ref is not None:
        with stage(f"encoding the reference {size[0]}x{size[1]}"):
            ref_latent = M.to_latent(vae, data.pil_to_tensor(ref).to(models.device))
    transformer = models.transformer()
    return generate(
        transformer, vae, txt, neg, models.sched, replace(s, size=size), ref_latent, on_step, progress
    )


# ----------------------------------------------------------------------------------------------------------
# Validation grids: the rows people look at, with their captions (Pillow only)


def font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def wrap(draw, text: str, width: float, face) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and draw.textlength(f"{line} {word}", font=face) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines or [""]


def validation_grid(rows: list[tuple[str, list[tuple[str, object]]]]):
    """One row per validation prompt: its caption (prompt, step, seed, guidance) above, then labelled
    images (reference | previews | result), each at the result's size."""
    from PIL import Image, ImageDraw

    face, small = font(15), font(12)
    w, h = max((row[-1][1].size for _, row in rows), key=lambda s: s[0] * s[1])
    cols = max(len(row) for _, row in rows)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [wrap(probe, caption, cols * w - 12, face) for caption, _ in rows]
    heights = [20 * len(t) + 10 + 16 + h for t in texts]
    grid = Image.new("RGB", (cols * w, sum(heights)), "white")
    draw, y = ImageDraw.Draw(grid), 0
    for (_, row), lines, height in zip(rows, texts, heights, strict=True):
        for i, line in enumerate(lines):
            draw.text((6, y + 5 + 20 * i), line, fill="black", font=face)
        top = y + 20 * len(lines) + 10
        for j, (label, image) in enumerate(row):
            draw.text((j * w + 4, top), label, fill=(90, 90, 90), font=small)
            grid.paste(image.resize((w, h)), (j * w, top + 16))
        y += height
    return grid


# ----------------------------------------------------------------------------------------------------------
# The command line: every input checked before the first model loads


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default=config.DEFAULT_MODEL, help="checkpoint folder, hub id, or tiny / tiny-t2i"
    )
    p.add_argument("--ref", help="the image to edit (edit checkpoints); leave out for text-to-image")
    p.add_argument("--prompt", help="the instruction (edit) or the description (t2i)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--guidance", type=float, default=4.5, help="CFG scale; <= 1 turns CFG off")
    p.add_argument(
        "--resolution", help="WxH, multiples of 16 (edit: ~1 MP at the reference's aspect; t2i: 1024x1024)"
    )
    p.add_argument("--out", help="output image (default: the next free edit-NNNN.png / t2i-NNNN.png here)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its previews) if they exist")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 on CUDA/MPS, float32 on CPU")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--attention", default="auto", help=f"SDPA kernels: {', '.join(M.ATTENTION_CHOICES)}")
    p.add_argument("--cfg-renorm", action=argparse.BooleanOptionalAction, default=True, help="t2i only")
    p.add_argument("--cfg-renorm-min", type=float, default=0.0)
    p.add_argument("--preview-every", type=int, default=0, help="also save the decoded image every N steps")
    p.add_argument("--lora", action="append", default=[], help="a LoRA .safetensors (repeatable)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="0 gives the base model exactly")
    p.add_argument("--quant", default="none", help="transformer weights: none | int8 | fp8 | fp8-compute")
    p.add_argument("--text-encoder-quant", default="none", help="text encoder weights: none | int8 | fp8")
    p.add_argument("--offload-blocks", type=int, default=0, help="stream N blocks' weights from CPU memory")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--serve", action="store_true", help="serve the edit web page instead (serve.py)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on")
    p.add_argument("--port", type=int, default=7860, help="--serve: the port")
    p.add_argument("--resident", action="store_true", help="--serve: keep every model on the GPU")
    return p.parse_args(argv)


def check_numbers(args: argparse.Namespace) -> None:
    finite = {
        "--guidance": args.guidance,
        "--lora-scale": args.lora_scale,
        "--cfg-renorm-min": args.cfg_renorm_min,
    }
    for flag, value in finite.items():
        if not math.isfinite(value):
            raise ValueError(f"{flag} {value}: must be a finite number")
    ranges = {
        "--steps": (args.steps, 1, 1000),
        "--seed": (args.seed, 0, 2**63 - 1),
        "--guidance": (args.guidance, 0, 100),
        "--cfg-renorm-min": (args.cfg_renorm_min, 0, 1),
        "--preview-every": (args.preview_every, 0, 1000),
        "--offload-blocks": (args.offload_blocks, 0, 60),
        "--port": (args.port, 1, 65535),
        "--lora-scale": (args.lora_scale, -100, 100),
    }
    for flag, (value, lo, hi) in ranges.items():
        if not lo <= value <= hi:
            raise ValueError(f"{flag} {value}: must be between {lo} and {hi}")


def check_loras(files: list[str], ckpt: Path) -> None:
    """Each --lora file read and held to the transformer's names and shapes (a meta-device model)."""
    import lora

    config = M._from_json(M.TransformerConfig, ckpt / "transformer/config.json")
    with torch.device("meta"):
        skeleton = M.LongCatTransformer(config)
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"--lora {f}: no such file")
        try:
            lora.check_lora(skeleton, *lora.read_lora(f))
        except ValueError as e:
            raise ValueError(f"--lora {e}") from None


def output_path(out: str | None, stem: str, overwrite: bool) -> Path:
    """Where the image goes: --out (never replaced without --overwrite) or the next free STEM-NNNN.png;
    its folder is made and checked to be writable now, not after the whole run."""
    path = Path(out) if out else next_free(stem)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out {path}: use a .png, .jpg or .webp file name")
    if path.is_dir() or (path.exists() and not overwrite):
        raise ValueError(f"--out {path}: already exists; pass --overwrite to replace it, or another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {path}: cannot write there ({e.strerror or e})") from None
    return path


def next_free(stem: str) -> Path:
    i = 0
    while Path(f"{stem}-{i:04d}.png").exists():
        i += 1
    return Path(f"{stem}-{i:04d}.png")


def save_image(image, path: Path, overwrite: bool) -> Path:
    """Write next to `path` and move it into place: a full disk leaves no partial file, and without
    overwrite a file that appeared meanwhile is never replaced (the next free name is taken instead)."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        image.save(tmp)
        while True:
            try:
                os.replace(tmp, path) if overwrite else os.link(tmp, path)
                break
            except FileExistsError:
                path = next_free(re.sub(r"-\d{4}$", "", path.with_suffix("").as_posix()))
    except OSError as e:
        raise ValueError(f"{path}: cannot write the image ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def prepare(args: argparse.Namespace) -> dict:
    """Everything that can be checked without a model, in the order a user would fix it."""
    import quant

    check_numbers(args)
    device = config.pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else config.default_dtype(device)
    for flag, mode in (("--quant", args.quant), ("--text-encoder-quant", args.text_encoder_quant)):
        try:
            quant.normalize_mode(mode, compute=flag == "--quant")
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    ckpt = config.resolve_checkpoint(args.model)
    flavour = config.read_flavour(ckpt)
    if not args.serve and not args.prompt:
        raise ValueError("--prompt is required (or --serve for the web page)")
    if not args.serve and flavour == "edit" and not args.ref:
        raise ValueError(f"{args.model} is an edit checkpoint: give the image to edit with --ref")
    if flavour == "t2i" and args.ref:
        raise ValueError(f"{args.model} is a text-to-image checkpoint: --ref needs LongCat-Image-Edit")
    head_dim = M.read_json(ckpt / "transformer/config.json").get("attention_head_dim", 128)
    config.check_attention_backend(args.attention, device, dtype, head_dim, grad=False, key="--attention")
    check_loras(args.lora, ckpt)
    ref = data.load_rgb(Path(args.ref), key="--ref") if args.ref else None
    size = config.parse_size(args.resolution) if args.resolution else None
    out = None if args.serve else output_path(args.out, "edit" if ref else "t2i", args.overwrite)
    if out is not None and args.preview_every:
        for step in range(args.preview_every, args.steps, args.preview_every):
            output_path(str(out.with_name(f"{out.stem}-step{step:03d}.png")), "", args.overwrite)
    return dict(device=device, dtype=dtype, ckpt=ckpt, flavour=flavour, ref=ref, size=size, out=out)


def run(args: argparse.Namespace) -> Path | None:
    plan = prepare(args)
    weights = Weights(
        args.quant, args.text_encoder_quant, tuple(args.lora), args.lora_scale, args.offload_blocks
    )
    weights.compile = args.compile
    models = Models(
        plan["ckpt"], plan["device"], plan["dtype"], weights, keep=args.serve, resident=args.resident
    )
    settings = Settings(
        plan["size"], args.seed, args.steps, args.guidance, args.negative_prompt, args.cfg_renorm
    )
    settings.cfg_renorm_min, settings.preview_every = args.cfg_renorm_min, args.preview_every
    if args.serve:
        import serve

        return serve.serve(partial(render, models), settings, plan["flavour"], args.host, args.port)
    image, previews = render(models, args.prompt, plan["ref"], settings)
    out = plan["out"]
    for step, preview in previews:
        save_image(preview, out.with_name(f"{out.stem}-step{step:03d}.png"), args.overwrite)
    out = save_image(image, out, args.overwrite)
    w, h = image.size
    print(f"wrote {out} ({w}x{h}, {args.steps} steps, guidance {args.guidance}, seed {args.seed})")
    return out


def end_progress() -> None:
    """Close the progress bars an error interrupted, so the error line starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    # CheckpointError, DataError, OutOfMemory are ValueErrors: a message, not a traceback
    except (ValueError, OSError) as e:
        end_progress()
        sys.exit("error: " + " ".join(str(e).split()))
    except KeyboardInterrupt:
        end_progress()
        sys.exit("interrupted")


if __name__ == "__main__":
    main()
