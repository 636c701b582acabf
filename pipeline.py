"""The LongCat-Image pipeline by hand: what diffusers' LongCatImageEditPipeline and
LongCatImagePipeline compute (diffusers/pipelines/longcat_image/pipeline_longcat_image_edit.py and
pipeline_longcat_image.py), written out in reading order, plus the one place the models are built
for use.

- Prompt encoding: Qwen2.5-VL with LongCat's chat templates; quoted text is tokenized one character
  at a time; the last hidden state of the prompt's 512 positions (t2i) or of the reference image's
  tokens and the prompt (edit).
- The sampler: the flow-matching Euler sampler with classifier-free guidance (Esser et al. 2024,
  "Scaling Rectified Flow Transformers", sec. 2; Ho & Salimans 2022 for CFG), the t2i pipeline's CFG
  renorm.
- `Settings` and `LIMITS`: what an image depends on besides the models and the prompt, and the range
  of each, checked here for the command line, the web page and training's validation alike.
- `generate()`: embeddings -> image; the CLI, the web page and training's validation share it.
- `build_transformer()`: the transformer for use, quantized while loading, adapted (LoRA files
  merged, or a trainable LoRA), offloaded and compiled; validate.py, serve.py, train.py and bench.py
  all build it here.
- `Models`: each model read from disk once; the text encoder never shares the GPU with the others,
  so peak GPU memory is the largest stage, not the sum. `render()`: prompt -> image on a Models.
- `explain_oom()`: a CUDA out-of-memory error turned into one line naming the stage and the knobs.
"""

from __future__ import annotations

import gc
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

import images
import lora
import model as M
import quant

# --------------------------------------------------------------------------------------------------
# Prompt encoding with Qwen2.5-VL (the pipelines' `encode_prompt`)

T2I_PREFIX = (
    "<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on "
    "an image content, suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n"
)
EDIT_SYSTEM = (
    "<|im_start|>system\nAs an image editing expert, first analyze the content and attributes of the "
    "input image(s). Then, based on the user's editing instructions, clearly and precisely determine "
    "how to modify the given image(s), ensuring that only the specified parts are altered and all "
    "other aspects remain consistent with the original(s).<|im_end|>\n<|im_start|>user\n"
)
VISION = "<|vision_start|><|image_pad|><|vision_end|>"  # one per reference image
EDIT_PREFIX = EDIT_SYSTEM + VISION
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
MAX_PROMPT_TOKENS = 512
QUOTES = [("'", "'"), ('"', '"'), ("\u2018", "\u2019"), ("\u201c", "\u201d")]


def split_quotes(prompt: str) -> list[tuple[str, bool]]:
    """Split a prompt into (text, quoted) spans; quoted spans keep their quote marks.
    Apostrophes inside words ("don't") are not quotes: they are hidden before splitting, restored
    after."""
    words = sorted(set(re.findall(r"[a-zA-Z]+'[a-zA-Z]+", prompt)))
    # longest mark first: each mark is a prefix of the longer ones
    hidden = [(w, "longcat_$##$_longcat" * (i + 1)) for i, w in reversed(list(enumerate(words)))]
    for w, mark in hidden:
        prompt = prompt.replace(w, mark)
    quoted = "|".join(
        re.escape(a) + "[^" + re.escape(a + b) + "]*?" + re.escape(b) for a, b in QUOTES
    )
    spans = []
    for part in re.split(f"({quoted})", prompt):
        for w, mark in hidden:
            part = part.replace(mark, w)
        if part:
            spans.append((part, re.match(quoted, part) is not None))
    return spans


def warn_once(message: str, said: set = set()) -> None:  # noqa: B006 - the set is the memory
    """Print a warning to stderr the first time it comes up in this process."""
    if message not in said:
        said.add(message)
        print(f"warning: {message}", file=sys.stderr)


class TextEncoder:
    """Qwen2.5-VL-7B as LongCat uses it: the chat template around the prompt, the last hidden state
    kept for the prompt's 512 positions (t2i) or for the reference images' tokens and the prompt
    (edit). A prompt longer than 512 tokens is cut, as the pipelines cut it, and `warn` says so."""

    def __init__(self, model, tokenizer, image_processor, warn: Callable[[str], None] = warn_once):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.warn = warn

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenize(self, prompt: str, where: str = "") -> list[int]:
        """Quoted text goes one character at a time (so the model can spell it), the rest normally;
        at most 512 tokens. `where` names the prompt's source (a caption file) in the warning."""
        out = []
        for text, quoted in split_quotes(prompt):
            if quoted:
                out += [i for ch in text for i in self.ids(ch)]
            else:
                out += self.ids(text)
        if len(out) > MAX_PROMPT_TOKENS:
            kept = self.tokenizer.decode(out[MAX_PROMPT_TOKENS - 8 : MAX_PROMPT_TOKENS])
            source = where or f"the prompt {prompt[:40]!r}..."
            self.warn(
                f"{source}: {len(out)} tokens, only the first {MAX_PROMPT_TOKENS} are used "
                f"(it is cut after ...{kept!r})"
            )
        return out[:MAX_PROMPT_TOKENS]

    @torch.no_grad()
    def encode(self, prompt: str, image=None, where: str = "") -> torch.Tensor:
        """Prompt (and, for editing, the reference PIL image or a list of them, at the output size)
        -> embeddings [1, L, D]. t2i: L = 512. Edit: each reference goes to Qwen at half size, in
        its own vision block; L = 2 K + (N_vl of every reference) + 512 for K references."""
        ids = self.tokenize(prompt, where)
        pads = MAX_PROMPT_TOKENS - len(ids)
        prompt_ids = ids + [self.tokenizer.pad_token_id] * pads
        prompt_mask = [1] * len(ids) + [0] * pads
        param = next(self.model.parameters())
        refs = [] if image is None else image if isinstance(image, list) else [image]
        extra = {}
        if not refs:
            prefix = self.ids(T2I_PREFIX)
            start = len(prefix)
        else:
            halves = [
                im.convert("RGB").resize((im.width // 2, im.height // 2), Image.LANCZOS)
                for im in refs
            ]
            vl = self.image_processor(images=halves, return_tensors="pt")
            merge = self.image_processor.merge_size**2
            blocks = ""
            for thw in vl["image_grid_thw"]:  # one vision block per image, with its own token count
                n_vl = int(thw.prod()) // merge
                blocks += VISION.replace("<|image_pad|>", "<|image_pad|>" * n_vl)
            prefix = self.ids(EDIT_SYSTEM + blocks)
            start = prefix.index(self.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
            extra = {
                "pixel_values": vl["pixel_values"].to(param.device, param.dtype),
                "image_grid_thw": vl["image_grid_thw"].to(param.device),
            }
        suffix = self.ids(SUFFIX)
        input_ids = torch.tensor([prefix + prompt_ids + suffix], device=param.device)
        mask = [1] * len(prefix) + prompt_mask + [1] * len(suffix)
        mask = torch.tensor([mask], device=param.device)
        # last_hidden_state comes after the final norm, as the pipelines' hidden_states[-1]
        out = self.model(input_ids=input_ids, attention_mask=mask, **extra).last_hidden_state
        return out[:, start : -len(suffix)]


def load_text_encoder(path: Path, dtype=torch.bfloat16, device="cpu", convert=None) -> TextEncoder:
    """Qwen2.5-VL from text_encoder/, with its tokenizer/ and text_processor/ (the image processor).
    transformers maps legacy and new tensor names; the LM head is dropped (only hidden states are
    used, 1 GB); the tokenizer pads on the right, as the pipelines assume; the image processor is
    the PIL one (no torchvision). The model loads on the CPU (a device_map would need accelerate),
    `convert(model)` (quantization) runs there, then it moves to `device`."""
    import transformers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    files = M.text_encoder_files(path)  # every weight file's header checked; names a bad one
    tokenizer = AutoTokenizer.from_pretrained(files["tokenizer"])
    tokenizer.padding_side = "right"
    processor = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    processor = processor or transformers.Qwen2VLImageProcessor
    with quiet_transformers():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(files["weights"], dtype=dtype)
    backbone = model.model
    if convert is not None:
        convert(backbone)
    backbone = backbone.to(device).eval().requires_grad_(False)
    return TextEncoder(backbone, tokenizer, processor.from_pretrained(files["image_processor"]))


@contextmanager
def quiet_transformers():
    """transformers' loading chatter (progress bars, warnings about rope keys in Qwen2.5-VL's
    config) is not the user's business: errors still come through."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# The sampler


def initial_noise(
    seed: int, height: int, width: int, dtype: torch.dtype, draw_dtype=None
) -> torch.Tensor:
    """The pipelines' starting noise [1, 16, H/8, W/8], drawn on the CPU so a seed means the same
    everywhere. The edit pipeline draws in its own dtype, the t2i pipeline in float32 then casts
    (draw_dtype)."""
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (1, 16, height // 8, width // 8)
    return torch.randn(shape, generator=g, dtype=draw_dtype or dtype).to(dtype)


def guide(
    v: torch.Tensor, v_neg: torch.Tensor, scale: float, renorm_min: float | None
) -> torch.Tensor:
    """Classifier-free guidance; with renorm (renorm_min not None) each token is rescaled so the
    guided velocity is never longer than the conditional one (the t2i pipeline's cfg renorm)."""
    guided = v_neg + scale * (v - v_neg)
    if renorm_min is None:
        return guided
    s = v.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)
    return guided * s.clamp(renorm_min, 1)


@torch.no_grad()
def sample(
    transformer,
    noise: torch.Tensor,
    txt: torch.Tensor,
    neg: torch.Tensor | None,
    sigmas: torch.Tensor,
    guidance: float,
    refs: list[torch.Tensor] = (),
    renorm_min: float | None = None,
    callback=None,
    progress: bool = True,
) -> torch.Tensor:
    """Euler sampler over the flow: noise [1, 16, h, w] normalised latent -> latent [1, 16, h, w].

    txt / neg [1, L, D] prompt embeddings (neg used when guidance > 1); refs: the clean reference
    latents [1, 16, h, w] for editing (their tokens ride along, model.image_sequence; only the
    target tokens' velocity is used). callback(i, latent [1, 16, h, w]) is called after each step.
    """
    _, _, h, w = noise.shape
    dtype = noise.dtype
    x = M.pack(noise)  # (1, N, 64)
    n = x.shape[1]
    conds = [txt, neg] if guidance > 1 and neg is not None else [txt]
    # the image stream's ids for each prompt's length, and the clean reference tokens, which are
    # the same at every step
    sequences = [M.image_sequence(noise, list(refs), c.shape[1]) for c in conds]
    ref_tokens = sequences[0][0][:, n:]  # (1, K N, 64)
    steps = range(len(sigmas) - 1)
    for i in tqdm(steps, desc="sampling", disable=not progress, leave=False, file=sys.stdout):
        # diffusers hands the model (sigma * 1000 in the model dtype) / 1000: match it for bit
        # parity.
        t = ((sigmas[i] * 1000).to(dtype) / 1000).expand(1).to(x.device)
        inp = torch.cat([x, ref_tokens], dim=1) if refs else x  # (1, N (1 + K), 64)
        velocities = []
        for c, (_, img_ids, txt_ids) in zip(conds, sequences, strict=True):
            velocities.append(transformer(inp, c, t, img_ids, txt_ids)[:, :n])
        v = velocities[0]
        if len(velocities) > 1:
            v = guide(v, velocities[1], guidance, renorm_min)
        dt = (sigmas[i + 1] - sigmas[i]).to(x.device)
        x = (x.float() + dt * v).to(v.dtype)  # Euler, in float32
        if callback is not None:
            callback(i, M.unpack(x, h, w))
    return M.unpack(x, h, w)


def edit_size(width: int, height: int, area: int = 1024 * 1024) -> tuple[int, int]:
    """The edit pipeline's output size: ~area pixels at the input's aspect ratio, sides rounded up
    to 16."""
    w = math.sqrt(area * width / height)
    h = w / (width / height)
    return int(-(-w // 16) * 16), int(-(-h // 16) * 16)


# A reference resized to a size whose aspect differs by more than this is said to be stretched
# (rounding sides to 16 px stretches small images by a few percent: diffusers does the same).
STRETCH = 0.10


def stretch(size: tuple[int, int], to: tuple[int, int]) -> float:
    """How much resizing `size` to `to` distorts its aspect: 0.25 = one side 25 % longer than the
    aspect would have it."""
    ratio = (to[0] / to[1]) / (size[0] / size[1])
    return max(ratio, 1 / ratio) - 1


# The range of every generation setting: validate.py's flags, the web page's form and training's
# validation_* keys are all held to these.
LIMITS = {
    "seed": (0, 2**63 - 1),
    "steps": (1, 1000),
    "guidance": (0.0, 100.0),
    "cfg_renorm_min": (0.0, 1.0),
    "preview_every": (0, 1000),
    "side": (16, 8192),  # width and height, multiples of 16
    "page_side": (16, 4096),  # the web page's form: a browser anywhere on the network may ask
}


def check_setting(name: str, value, key: str = "") -> None:
    """A ValueError naming `key` (the flag, form field or config key) when `value` is outside
    LIMITS[name] or not finite."""
    lo, hi = LIMITS[name]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key or name} {value}: must be a finite number")
    if not lo <= value <= hi:
        raise ValueError(f"{key or name} {value}: must be between {lo} and {hi}")


def parse_size(text: str, key: str = "--resolution") -> tuple[int, int]:
    """'WxH' -> (W, H), both multiples of 16 within LIMITS["side"]."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"{key} {text!r}: expected WxH, e.g. 1024x768") from None
    check_size(w, h, key)
    return w, h


def check_side(value: int, key: str, limit: str = "side") -> None:
    """One side of an image: a multiple of 16 within LIMITS[limit]."""
    lo, hi = LIMITS[limit]
    if value % 16 or not lo <= value <= hi:
        near = min(max(value // 16 * 16, lo), hi)
        raise ValueError(f"{key} {value}: must be a multiple of 16 in {lo}..{hi} (e.g. {near})")


def check_size(w: int, h: int, key: str = "--resolution") -> None:
    lo, hi = LIMITS["side"]
    if w % 16 or h % 16 or not (lo <= w <= hi and lo <= h <= hi):
        near_w = min(max(w // 16 * 16, lo), hi)
        near_h = min(max(h // 16 * 16, lo), hi)
        raise ValueError(
            f"{key} {w}x{h}: width and height must be multiples of 16 in {lo}..{hi} "
            f"(e.g. {near_w}x{near_h})"
        )


@dataclass
class Settings:
    """What an image depends on besides the models and the prompt: validate.py's flags, the web
    page's form, training's validation_* keys. Defaults are the seed's validation values."""

    size: tuple[int, int] | None = None  # (W, H); None: ~1 MP at the reference's aspect, or 1024²
    seed: int = 0
    steps: int = 40
    guidance: float = 4.5  # <= 1: no CFG
    negative: str = ""
    cfg_renorm: bool = True  # t2i only; the edit pipeline never renormalises
    cfg_renorm_min: float = 0.0
    preview_every: int = 0  # also decode the latent every N steps

    def check(self, keys: dict[str, str] | None = None) -> None:
        """Every number within LIMITS; `keys` maps a field to the name the user knows it by."""
        keys = keys or {}
        for name in ("seed", "steps", "guidance", "cfg_renorm_min", "preview_every"):
            check_setting(name, getattr(self, name), keys.get(name, name))
        if self.size is not None:
            check_size(*self.size, keys.get("size", "size"))


@torch.no_grad()
def generate(
    transformer,
    vae,
    txt: torch.Tensor,
    neg: torch.Tensor | None,
    sched: dict,
    s: Settings,
    refs: list[torch.Tensor] = (),
    on_step=None,
    progress: bool = True,
):
    """Prompt embeddings [1, L, D] (neg: None without CFG) -> (image, [(step, preview image), ...]).

    s.size (W, H) must be set; refs: the reference latents [1, 16, H/8, W/8] for editing. The noise
    comes from s.seed on the CPU, so the training RNG and other devices are untouched.
    on_step(step, steps, preview image or None) reports progress. A non-finite result is an error,
    never a black picture."""
    w, h = s.size
    # an adapter may wrap x_embedder (LyCORIS's whole-model preset): the base layer's weight
    param = getattr(transformer.x_embedder, "base", transformer.x_embedder).weight
    # The edit pipeline draws its noise in the model dtype, the t2i pipeline in float32.
    draw_dtype = None if refs else torch.float32
    noise = initial_noise(s.seed, h, w, param.dtype, draw_dtype).to(param.device)
    sigmas = M.schedule(s.steps, (h // 16) * (w // 16), sched)
    renorm_min = s.cfg_renorm_min if s.cfg_renorm and not refs else None
    previews = []

    def step_done(i: int, latent: torch.Tensor) -> None:
        image = None
        if s.preview_every and (i + 1) % s.preview_every == 0 and i + 1 < s.steps:
            image = images.tensor_to_pil(M.from_latent(vae, latent))
            previews.append((i + 1, image))
        if on_step is not None:
            on_step(i + 1, s.steps, image)

    txt = txt.to(param)
    neg = None if neg is None else neg.to(param)
    with explain_oom(f"sampling {w}x{h}", device=param.device):
        z = sample(
            transformer,
            noise,
            txt,
            neg,
            sigmas,
            s.guidance,
            refs=refs,
            renorm_min=renorm_min,
            callback=step_done,
            progress=progress,
        )
    if not torch.isfinite(z).all():
        raise ValueError(
            "the sampled image is not finite (NaN or inf): the transformer's weights (a damaged "
            "checkpoint), a LoRA or --lora-scale that breaks the model, or float16 overflow (try "
            "--dtype bfloat16)"
        )
    with explain_oom(f"decoding {w}x{h}", device=param.device):
        x = M.from_latent(vae, z)  # (1, 3, H, W)
    if not torch.isfinite(x).all():  # a NaN pixel would be written as black, with no word
        raise ValueError(
            "the decoded image is not finite (NaN or inf): the VAE's weights (a damaged "
            "checkpoint) or float16 overflow (try --dtype bfloat16)"
        )
    return images.tensor_to_pil(x), previews


# --------------------------------------------------------------------------------------------------
# Out of memory, as a message

KNOBS = "--quant int8, --text-encoder-quant int8, --offload-blocks N or a smaller --resolution"


class OutOfMemory(ValueError):
    """A stage ran out of GPU memory; the message names it, the allocation and the knobs that lower
    memory."""


@contextmanager
def explain_oom(what: str, knobs: str = KNOBS, device: torch.device | None = None):
    """A CUDA out-of-memory error inside the block becomes OutOfMemory: one line naming `what` was
    being done, the allocation that failed, the memory in use on `device`, and the knobs."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        tried = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", str(e))
        detail = tried.group(0).lower() if tried else "no detail"
        if device is not None and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            used = torch.cuda.memory_allocated(device) / 2**30
            detail += f"; {used:.1f} of {total:.1f} GiB in use"
        raise OutOfMemory(
            f"out of GPU memory while {what} ({detail}); lower memory with {knobs}"
        ) from None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so the error line starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


# --------------------------------------------------------------------------------------------------
# The models, built for use


def quantizer(mode: str, targets=quant.DEFAULT_TARGETS):
    """The `convert` hook that quantizes a model while it loads (quant.py), or None for full
    precision."""
    mode = quant.normalize_mode(mode)
    if mode == "none":
        return None

    def convert(model: torch.nn.Module) -> None:
        quant.quantize_model(model, mode, targets)

    return convert


def build_transformer(
    source: Path | M.TransformerConfig,
    device: torch.device,
    dtype: torch.dtype,
    quant_mode: str = "none",
    adapt: Callable[[M.LongCatTransformer], None] | None = None,
    offload_blocks: int = 0,
    compile: bool = False,
    knobs: str = KNOBS,
) -> M.LongCatTransformer:
    """The transformer for use, in one order everywhere:

    1. its weights: a checkpoint folder's, quantized while they load (peak memory stays near the
       quantized size), or random ones for a TransformerConfig (bench.py), quantized after;
    2. `adapt(transformer)`: LoRA files merged (inference) or a trainable adapter injected
       (training);
    3. the first `offload_blocks` blocks' frozen weights to pinned CPU memory, streamed in as they
       run; everything else to `device`;
    4. torch.compile on each block's compute (regional).
    Out of memory on the way is one line naming the stage and the `knobs`. Whether the device can
    run `quant_mode` is the caller's check (quant.check_device), made before any work."""
    where = torch.device("cpu") if offload_blocks else device  # offloaded blocks stay on the CPU
    with explain_oom("loading the transformer", knobs, device):
        if isinstance(source, M.TransformerConfig):
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # made in dtype: the released model in float32 is 25 GB
            try:
                # made on the device even when blocks will be offloaded: random weights drawn on
                # another device differ, and the bench compares setups on the same weights
                with torch.device(device):
                    transformer = M.LongCatTransformer(source).requires_grad_(False)
            finally:
                torch.set_default_dtype(default)
            convert = quantizer(quant_mode)
            if convert is not None:
                convert(transformer)
        else:
            transformer = M.load_transformer(source, dtype, where, convert=quantizer(quant_mode))
    if adapt is not None:
        adapt(transformer)
    with explain_oom(f"moving the transformer to {device}", knobs, device):
        if offload_blocks:
            transformer.offload_blocks(offload_blocks, device)
        transformer.to(device)
    if compile:
        transformer.compile_blocks()
    return transformer


def merge_lora_files(files: list[str], scale: float) -> Callable[[M.LongCatTransformer], None]:
    """The `adapt` step of inference: each LoRA file merged into the weights, so several (of any
    ranks) stack; one file stays a LoRA layer, so --lora-scale 0 gives the base model exactly."""

    def adapt(transformer: M.LongCatTransformer) -> None:
        for f in files:
            lora.load_lora(transformer, f, scale=scale)
            if len(files) > 1:
                lora.merge_and_unload(transformer)

    return adapt


@dataclass
class LoadOptions:
    """How the models are read: validate.py's --quant, --text-encoder-quant, --lora, --lora-scale,
    --offload-blocks and --compile (training sets only the text encoder's precision)."""

    quant: str = "none"
    text_encoder_quant: str = "none"
    loras: tuple = ()
    lora_scale: float = 1.0
    offload_blocks: int = 0
    compile: bool = False


class Models:
    """A checkpoint's text encoder, VAE and transformer, each read from disk at its first use and
    then kept (`loads` counts the reads). Asking for the text encoder moves the other two to the
    CPU; asking for either of them moves the text encoder there, or frees it with keep=False (the
    one-shot CLI): the text encoder never shares the GPU. `resident=True` leaves everything on the
    device."""

    def __init__(
        self,
        ckpt: Path,
        device,
        dtype: torch.dtype,
        options: LoadOptions,
        keep: bool = True,
        resident: bool = False,
    ):
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = dtype
        self.options = options
        self.keep = keep
        self.resident = resident
        self.flavour = M.read_flavour(ckpt)
        self.sched = M.read_scheduler(ckpt)
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
        if not self.resident:
            for other in others:
                if other in self.built and self.keep:
                    self._move(other, torch.device("cpu"))
                elif other in self.built:
                    self.drop(other)
        if name not in self.built:
            with explain_oom(f"loading the {name.replace('_', ' ')}", device=self.device):
                self.built[name] = getattr(self, f"_load_{name}")()
            self.loads[name] += 1
        self._move(name, self.device)
        return self.built[name]

    def _move(self, name: str, device: torch.device) -> None:
        m = self.built[name]
        if isinstance(m, TextEncoder):
            m = m.model
        if next(m.parameters()).device != device:
            with explain_oom(f"moving the {name.replace('_', ' ')} to {device}", device=device):
                m.to(device)
            free_memory()

    def _load_text_encoder(self) -> TextEncoder:
        convert = quantizer(self.options.text_encoder_quant, quant.TEXT_ENCODER_TARGETS)
        return load_text_encoder(self.ckpt, self.dtype, self.device, convert=convert)

    def _load_vae(self) -> M.VAE:
        return M.load_vae(self.ckpt, self.dtype, self.device)

    def _load_transformer(self) -> M.LongCatTransformer:
        o = self.options
        return build_transformer(
            self.ckpt,
            self.device,
            self.dtype,
            quant_mode=o.quant,
            adapt=merge_lora_files(list(o.loras), o.lora_scale),
            offload_blocks=o.offload_blocks,
            compile=o.compile,
        )


def render(
    models: Models, prompt: str, ref, s: Settings, on_step=None, progress=True, on_warning=None
):
    """The whole pipeline on a Models: prompt (+ the reference PIL image to edit, or a list of them)
    -> (image, previews). The output size is ~1 MP at the first reference's aspect, or s.size
    (where s.size would stretch the first reference by over STRETCH, its area at the reference's
    aspect); every reference is resized to it. on_warning(message) hears what is worth a word (a
    prompt cut at 512 tokens, a stretched reference); by default it goes to stderr once."""
    refs = [] if ref is None else ref if isinstance(ref, list) else [ref]
    warn = on_warning or warn_once
    if s.size is not None:
        size = s.size
        if refs and (d := stretch(refs[0].size, size)) > STRETCH:  # keep its aspect, at that area
            size = edit_size(*refs[0].size, area=size[0] * size[1])
            warn(
                "{}x{} would stretch the reference ({}x{}) by {:.0%}: the edit keeps the "
                "reference's aspect at that area, {}x{}".format(*s.size, *refs[0].size, d, *size)
            )
    elif refs:
        size = edit_size(*refs[0].size)
    else:
        size = (1024, 1024)
    for k, r in enumerate(refs[1:], start=2):
        if (d := stretch(r.size, size)) > STRETCH:
            warn(
                "reference {} ({}x{}) is stretched by {:.0%} to {}x{}, the first reference's "
                "shape".format(k, *r.size, d, *size)
            )
    refs = [r.resize(size, Image.LANCZOS) for r in refs]
    with explain_oom("encoding the prompt", device=models.device):
        te = models.text_encoder()
        te.warn = warn
        txt = te.encode(prompt, refs or None)
        neg = None
        if s.guidance > 1:  # the negative prompt sees the same reference images
            neg = te.encode(s.negative, refs or None, "the negative prompt")
    vae = models.vae()
    latents = []
    with explain_oom(f"encoding the reference {size[0]}x{size[1]}", device=models.device):
        for r in refs:
            latents.append(M.to_latent(vae, images.pil_to_tensor(r).to(models.device)))
    transformer = models.transformer()
    settings = replace(s, size=size)
    return generate(transformer, vae, txt, neg, models.sched, settings, latents, on_step, progress)
