"""Datasets for minicat: SimpleTuner-style `[[datasets]]` config, aspect buckets, latent and text-embedding
caches, and a resumable bucketed loader.

An edit dataset (captions = instructions) names its reference dataset in `conditioning_data`; files pair by
their path inside the folder minus the extension (folders are searched recursively, hidden ones skipped). Both
images of a pair are resized (cover, Lanczos) and centre-cropped into the bucket nearest the *target's* aspect
ratio, so a reference never gets a size of its own or a W/H swap and batches > 1 stack (ostris/ai-toolkit#487,
#707). A dataset that names no reference and is named by none is text-to-image. Buckets follow the official
recipe's 64-px tables: area ~ resolution², aspect 0.5-2 (SPEC §6).

Cache entries are safetensors files named by the sha256 of everything they depend on (image bytes, bucket,
model identity, dtype, CACHE_VERSION), so a changed image, bucket or model is a miss, never a stale hit.
Latents are stored float32 [16, H/8, W/8] (small, as exact as the VAE gave them); text embeddings [L, D] in
the encoder's dtype (~50x larger). An edit embedding sees the reference, so it is keyed by (instruction,
reference bytes, bucket), and every reference also gets the empty instruction for caption dropout, encoded
with the real reference as the official recipe does (research/peers.md §4.6, §5, §8). Writes go to
`<name>.tmp-<pid>`, then os.replace, so a killed run leaves no half entry under a real name; an entry that
does not open is re-made. Dataset folders are only ever read.

Checks run before any encoder call and name every offender at once (missing references or captions,
unreadable, truncated or oversized images). `python data.py config.toml` builds the caches with model.py's
encoders and prints a report; a problem exits non-zero with one `error:` line each.
"""

import argparse
import difflib
import hashlib
import io
import json
import math
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from tqdm import tqdm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CACHE_VERSION = "minicat-data-1"  # bump when this file changes what an entry holds: all entries then miss
DEFAULT_CHECKPOINT = "meituan-longcat/LongCat-Image-Edit"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_PIXELS = 8192 * 8192  # refused before decoding: bigger files are scans or mistakes, and GBs as RGB
LATENT_CHANNELS, VAE_FACTOR = 16, 8  # the FLUX.1 VAE (SPEC §1)


class DataError(ValueError):
    """Problems with the config or the data, one self-contained line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ----------------------------------------------------------------------------------------------------------
# Config: SimpleTuner's key names, checked strictly


@dataclass
class DatasetConfig:
    id: str
    instance_data_dir: Path
    cache_dir_vae: Path
    cache_dir_text: Path  # default: a `text` folder beside cache_dir_vae
    resolution: int = 1024  # bucket area = resolution² px (SimpleTuner's pixel_area); not for references
    alignment: int = 64  # the config's top-level aspect_bucket_alignment
    caption_strategy: str | None = None  # textfile | filename | instanceprompt | None (reference sets)
    instance_prompt: str | None = None
    conditioning_data: str | None = None  # id of the reference dataset, for edit datasets
    repeats: int = 0  # extra appearances of each sample per epoch (0: once)
    role: str = "t2i"  # "edit", "reference" or "t2i": derived from conditioning_data


KEYS = {"id": str, "type": str, "dataset_type": str, "disabled": bool, "instance_data_dir": str,
        "caption_strategy": str, "instance_prompt": str, "resolution": int, "resolution_type": str,
        "cache_dir_vae": str, "cache_dir_text": str, "conditioning_data": (str, list),
        "conditioning_type": str, "repeats": int}  # fmt: skip
CHOICES = {"type": ["local"], "dataset_type": ["image", "conditioning"], "resolution_type": ["pixel_area"],
           "caption_strategy": ["textfile", "filename", "instanceprompt", "none"],
           "conditioning_type": ["reference_strict", "reference_loose"]}  # fmt: skip
REQUIRED = ("id", "instance_data_dir", "cache_dir_vae")


def _key_problems(entry: dict, where: str) -> list[str]:
    out = [f"{where}: missing {k}" for k in REQUIRED if k not in entry]
    for key, value in entry.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            out.append(f"{where}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        elif (not isinstance(value, KEYS[key]) or (KEYS[key] is int and isinstance(value, bool))
              or (isinstance(value, list) and not all(isinstance(v, str) for v in value))):  # fmt: skip
            want = "a list of dataset ids" if key == "conditioning_data" else KEYS[key].__name__
            out.append(f"{where}: {key} should be {want}, got {value!r}")
        elif key in CHOICES and value not in CHOICES[key]:
            out.append(f"{where}: {key} = {value!r} is not supported (use one of {CHOICES[key]})")
    return out


def parse_datasets(entries: object, base_dir: Path, alignment: object = 64) -> list[DatasetConfig]:
    """The config's `[[datasets]]` list -> checked DatasetConfigs; relative paths are relative to base_dir."""
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment % 16:
        raise DataError([f"aspect_bucket_alignment must be a positive multiple of 16, got {alignment!r}"])
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise DataError(["the config needs [[datasets]] tables"])
    path = lambda v: (base_dir / Path(v).expanduser()).resolve()  # an absolute v replaces base_dir
    problems, datasets = [], []
    for n, e in enumerate(entries):
        e = {k: v for k, v in e.items() if v is not None}  # a JSON null (SimpleTuner's configs) means unset
        where = f"dataset '{e['id']}'" if isinstance(e.get("id"), str) else f"datasets[{n}]"
        if found := _key_problems(e, where):
            problems += found
            continue
        cond = e.get("conditioning_data", [])
        cond = [cond] if isinstance(cond, str) else cond
        vae, text = path(e["cache_dir_vae"]), e.get("cache_dir_text")
        strategy = None if e.get("caption_strategy") == "none" else e.get("caption_strategy")
        text = path(text) if text else vae.parent / "text"
        res, prompt, repeats = e.get("resolution", 1024), e.get("instance_prompt"), e.get("repeats", 0)
        ds = DatasetConfig(e["id"], path(e["instance_data_dir"]), vae, text, res, alignment, strategy, prompt,
                           cond[0] if cond else None, repeats)  # fmt: skip
        if len(cond) > 1:
            problems.append(f"{where}: conditioning_data names {len(cond)} datasets; one is supported")
        if ds.resolution < alignment or ds.repeats < 0:
            problems.append(f"{where}: resolution must be >= {alignment} and repeats >= 0")
        if not e.get("disabled"):
            datasets.append(ds)
    if problems:  # before the cross-checks, which would only echo these
        raise DataError(problems)
    ids = [d.id for d in datasets]
    problems += [f"dataset '{i}': the id is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    by_id = {d.id: d for d in datasets}
    for ds in datasets:
        if ds.conditioning_data == ds.id:
            problems.append(f"dataset '{ds.id}': conditioning_data names the dataset itself")
        elif ds.conditioning_data in by_id:
            ds.role, by_id[ds.conditioning_data].role = "edit", "reference"
        elif ds.conditioning_data is not None:
            close = difflib.get_close_matches(cond := ds.conditioning_data, ids, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"ids: {', '.join(ids)}"
            problems.append(f"dataset '{ds.id}': conditioning_data: no dataset '{cond}' ({hint})")
    if problems:  # the roles below would be guesses
        raise DataError(problems)
    for ds in datasets:
        where = f"dataset '{ds.id}'"
        if ds.role == "reference" and ds.conditioning_data:
            problems.append(f"{where}: a reference dataset cannot have conditioning_data of its own")
        if ds.role == "reference" and ds.caption_strategy:
            problems.append(f"{where}: reference images take no captions (the edit set's are used)")
        if ds.role != "reference" and not ds.caption_strategy:
            what = "its instructions" if ds.role == "edit" else "captions (or conditioning_data for edits)"
            problems.append(f"{where}: needs a caption_strategy for {what}")
        if ds.caption_strategy == "instanceprompt" and not ds.instance_prompt:
            problems.append(f"{where}: caption_strategy 'instanceprompt' needs instance_prompt")
        for d in datasets:  # a cache inside an image folder would break the promise never to write there
            for cache in sorted({ds.cache_dir_vae, ds.cache_dir_text}):
                if cache.is_relative_to(d.instance_data_dir):
                    problems.append(f"{where}: cache folder {cache} is inside the images of '{d.id}'")
    if problems:
        raise DataError(problems)
    return datasets


# ----------------------------------------------------------------------------------------------------------
# Images and buckets

# Pillow raises DecompressionBombError past 2x its own limit (~179 MP) and only warns between 1x and 2x; our
# lower limit refuses those first, so no warning filter is needed (catch_warnings is not thread-safe anyway).
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_rgb(path: Path, data: bytes | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image (from data if given, else read) fully decoded, EXIF-rotated, as 8-bit RGB with transparency
    composited on white. Raises DataError naming the file when it is unreadable, truncated or too large."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may set it; truncated files must fail
    try:
        with Image.open(io.BytesIO(data) if data else path) as img:
            if img.width * img.height > max_pixels:  # from the header, before decoding
                raise OSError(f"{img.width}x{img.height} is over {max_pixels / 2**20:.0f} MP; downscale it")
            img.load()  # decodes everything: raises on a truncated file
            img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):  # deep grey: Pillow's convert clips it
            a = np.asarray(img, dtype=np.float64)
            scale = 257.0 if img.mode.startswith("I;16") or a.max() > 255 else 1.0  # 65535 / 257 = 255
            img = Image.fromarray(np.clip(np.round(a / scale), 0, 255).astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")  # a plain convert("RGB") shows the colour hidden under clear pixels
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return img.convert("RGB")
    except READ_ERRORS as e:  # ValueError: also a mode Pillow cannot convert to RGB
        raise DataError([f"{path}: cannot read image ({e})"]) from None


def fit(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Cover the bucket (W, H) and crop the centre; width stays width."""
    return ImageOps.fit(img, bucket, Image.LANCZOS, centering=(0.5, 0.5))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1]."""
    a = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    return (a.permute(2, 0, 1)[None].float() / 127.5 - 1.0).contiguous()  # (1, 3, H, W)


def make_buckets(resolution: int, alignment: int = 64) -> list[tuple[int, int]]:
    """(W, H) on the alignment grid, from tall to wide: for each W the H with W·H closest to resolution²,
    aspect within 0.5-2, and each bucket's transpose too, so portrait and landscape get the same choices."""
    out, area = set(), resolution * resolution
    for w in range(alignment, 2 * resolution + alignment, alignment):
        h = max(alignment, round(area / w / alignment) * alignment)
        if 0.5 <= w / h <= 2:
            out |= {(w, h), (h, w)}
    return sorted(out, key=lambda b: b[0] / b[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio, so 2:1 and 1:2 are equally far from 1:1."""
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(size[0] / size[1])))


# ----------------------------------------------------------------------------------------------------------
# Scanning: pairs, captions, buckets, all checked before any model work


@dataclass
class Sample:
    dataset: str
    target: Path
    reference: Path | None  # None: text-to-image
    captions: list[str]  # variants (textfile lines, as SimpleTuner); one is drawn per epoch
    repeats: int = 0
    size: tuple[int, int] = (0, 0)  # target (W, H) after EXIF rotation
    bucket: tuple[int, int] = (0, 0)  # (W, H) of target and reference alike
    target_hash: str = ""
    reference_hash: str = ""
    entries: dict = field(default_factory=dict)  # by build_caches: target, reference, texts, empty


def _list_images(folder: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.suffix.lower() in IMAGE_EXTS and not any(s.startswith(".") for s in rel.parts) and p.is_file():
            files.setdefault(rel.with_suffix("").as_posix(), []).append(p)
    return files


def _captions(ds: DatasetConfig, path: Path) -> list[str]:
    if ds.caption_strategy == "instanceprompt":
        return [ds.instance_prompt]
    if ds.caption_strategy == "filename":
        return [c] if (c := path.stem.replace("_", " ").strip()) else []
    try:
        lines = path.with_suffix(".txt").read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):  # reported with the missing ones
        return []
    return [s.strip() for s in lines if s.strip()]


def _inspect(path: Path) -> tuple[str, tuple[int, int]] | str:
    """(sha256, (W, H)) of a fully decoded image, or the problem."""
    try:
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), load_rgb(path, data).size
    except DataError as e:
        return e.problems[0]
    except OSError as e:
        return f"{path}: cannot read ({e})"


def scan(datasets: list[DatasetConfig]) -> list[Sample]:
    """Every training sample, checked: pairs complete, captions present, every image decodes. Raises
    DataError naming every offender; cheap checks come first so they answer fast."""
    by_id, problems, samples, listing = {d.id: d for d in datasets}, [], [], {}
    for ds in datasets:
        if not ds.instance_data_dir.is_dir():
            problems.append(f"dataset '{ds.id}': instance_data_dir {ds.instance_data_dir} is not a folder")
            continue
        listing[ds.id] = files = _list_images(ds.instance_data_dir)
        if not files:
            problems.append(f"dataset '{ds.id}': no {'/'.join(sorted(IMAGE_EXTS))} in {ds.instance_data_dir}")
        for ps in (ps for ps in files.values() if len(ps) > 1):
            problems.append(f"dataset '{ds.id}': {', '.join(p.name for p in ps)} share a name")
    if problems:
        raise DataError(problems)
    for ds in (d for d in datasets if d.role != "reference"):
        refs, orphans, uncaptioned = listing[ds.conditioning_data] if ds.role == "edit" else {}, [], []
        for stem, (path, *_) in listing[ds.id].items():
            if ds.role == "edit" and stem not in refs:
                orphans.append(path.relative_to(ds.instance_data_dir).as_posix())
            elif not (captions := _captions(ds, path)):
                uncaptioned.append(path.relative_to(ds.instance_data_dir).as_posix())
            else:
                samples.append(Sample(ds.id, path, refs[stem][0] if refs else None, captions, ds.repeats))
        if orphans:
            where = by_id[ds.conditioning_data].instance_data_dir
            problems.append(f"dataset '{ds.id}': no reference of the same name in {where} for {len(orphans)} "
                            f"image(s): {', '.join(orphans)}")  # fmt: skip
        if uncaptioned:
            what = "a caption" + (
                " file (missing, empty, not UTF-8)" if ds.caption_strategy == "textfile" else ""
            )
            problems.append(f"dataset '{ds.id}': {len(uncaptioned)} without {what}: {', '.join(uncaptioned)}")
    if problems:
        raise DataError(problems)
    paths = sorted({p for s in samples for p in (s.target, s.reference) if p is not None})
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        info = dict(zip(paths, pool.map(_inspect, paths), strict=True))
    if problems := [v for v in info.values() if isinstance(v, str)]:
        raise DataError(problems)
    for s in samples:
        ds = by_id[s.dataset]
        s.target_hash, s.size = info[s.target]
        s.reference_hash = info[s.reference][0] if s.reference else ""
        s.bucket = nearest_bucket(s.size, make_buckets(ds.resolution, ds.alignment))
    return samples


# ----------------------------------------------------------------------------------------------------------
# Caches


def entry_name(*parts: str) -> str:
    """A cache entry's file name: the sha256 of everything its tensor depends on."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest() + ".safetensors"


def _valid(path: Path, key: str, shape: tuple[int, ...] | None, ndim: int) -> bool:
    try:
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("format") != CACHE_VERSION or key not in f.keys():
                return False
            got = tuple(f.get_slice(key).get_shape())
    except (OSError, SafetensorError):  # missing, cut short by a crash, or not safetensors at all
        return False
    return len(got) == ndim and (shape is None or got == shape)


def _write(path: Path, key: str, tensor: torch.Tensor, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(save({key: tensor.detach().cpu().contiguous()}, {**metadata, "format": CACHE_VERSION}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a reader sees no entry or the whole one


def _load_fitted(path: Path, sha: str, bucket: tuple[int, int]) -> Image.Image:
    """The image in its bucket, refusing a file edited since the scan (its entries carry the old bytes)."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise DataError([f"{path} changed while caching; run again"])
    return fit(load_rgb(path, data), bucket)


@dataclass
class Report:
    samples: list[Sample]
    buckets: Counter  # (dataset id, W, H) -> pairs
    hits: int = 0  # distinct entries found valid
    misses: int = 0  # distinct entries (re)written
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.samples)} samples; cache entries: {self.hits} reused, {self.misses} written"]
        lines += [f"  {ds} {w}x{h}: {n}" for (ds, w, h), n in sorted(self.buckets.items())]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def build_caches(
    datasets: list[DatasetConfig],
    encode_latents: Callable[[torch.Tensor], torch.Tensor] | None,
    encode_text: Callable[[str, Image.Image | None], torch.Tensor] | None,
    model_id: str,
    dtype_name: str,
    progress: bool = True,
    samples: list[Sample] | None = None,
) -> Report:
    """Write every missing cache entry, reuse every valid one. encode_latents: [1, 3, H, W] in [-1, 1] ->
    [1, 16, H/8, W/8]; encode_text: (prompt, reference at the bucket size or None) -> [1, L, D]. With None
    encoders it only checks (a miss is an error). `samples`: a scan the caller has just run."""
    samples = scan(datasets) if samples is None else samples
    by_id, status = {d.id: d for d in datasets}, {}  # status: entry -> valid; each checked once

    def valid(path: Path, key: str, shape: tuple[int, ...] | None, ndim: int) -> bool:
        if path not in status:
            status[path] = _valid(path, key, shape, ndim)
        return status[path]

    todo = []
    for s in samples:
        ds, (w, h) = by_id[s.dataset], s.bucket
        name = lambda kind, *parts: entry_name(kind, *parts, model_id, dtype_name)
        ctx = [s.reference_hash, f"{w}x{h}"] if s.reference else []  # t2i text depends on the text alone
        s.entries = {"target": ds.cache_dir_vae / name("latent", s.target_hash, f"{w}x{h}"),
                     "texts": [ds.cache_dir_text / name("text", c, *ctx) for c in s.captions],
                     "empty": ds.cache_dir_text / name("text", "", *ctx)}  # fmt: skip
        if s.reference:
            ref_dir = by_id[ds.conditioning_data].cache_dir_vae
            s.entries["reference"] = ref_dir / name("latent", s.reference_hash, f"{w}x{h}")
        shape = (LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR)
        ok = [valid(s.entries[k], "latent", shape, 3) for k in ("target", "reference") if k in s.entries]
        if not all(ok + [valid(p, "text", None, 2) for p in [*s.entries["texts"], s.entries["empty"]]]):
            todo.append(s)
    hits = sum(status.values())
    if todo and (encode_latents is None or encode_text is None):
        raise DataError([f"{len(status) - hits} cache entries are missing, e.g. for {todo[0].target}; "
                         "build them with `python data.py <config.toml>`"])  # fmt: skip
    written = 0
    for s in tqdm(todo, desc="caching", unit="pair", disable=not (progress and todo)):
        (w, h), meta = s.bucket, {"source": str(s.reference or s.target), "bucket": f"{w}x{h}"}
        texts = zip([*s.captions, ""], [*s.entries["texts"], s.entries["empty"]], strict=True)
        texts = [(c, p) for c, p in texts if not status[p]]
        latents = [k for k in ("target", "reference") if k in s.entries and not status[s.entries[k]]]
        need_ref = s.reference and ("reference" in latents or texts)
        ref = _load_fitted(s.reference, s.reference_hash, s.bucket) if need_ref else None
        for k in latents:
            img = ref if k == "reference" else _load_fitted(s.target, s.target_hash, s.bucket)
            with torch.inference_mode():
                z = encode_latents(to_tensor(img))
            assert z.shape == (1, LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR), (k, z.shape, s.bucket)
            _write(s.entries[k], "latent", z[0].float(), {**meta, "source": str(getattr(s, k))})
            status[s.entries[k]], written = True, written + 1
        for caption, path in texts:
            if not status[path]:  # checked per entry: an earlier sample may have written the same one
                with torch.inference_mode():
                    t = encode_text(caption, ref)
                assert t.ndim == 3 and t.shape[0] == 1, (caption, t.shape)
                _write(path, "text", t[0], {**meta, "prompt": caption})
                status[path], written = True, written + 1
    report = Report(samples, Counter((s.dataset, *s.bucket) for s in samples), hits, written)
    for s in (s for s in samples if 4 * s.size[0] * s.size[1] < s.bucket[0] * s.bucket[1]):
        report.warnings.append(f"{s.target} ({s.size[0]}x{s.size[1]}) is upscaled over 2x into {s.bucket}")
    return report


# ----------------------------------------------------------------------------------------------------------
# Loader


class Loader:
    """Shuffled batches from one bucket at a time, read from the caches. Yields dicts:
    target [B, 16, h, w] f32; reference [B, 16, h, w] f32 or None (t2i); text [B, L, D]; text_empty [B, L, D]
    (the empty instruction with the same reference, for caption dropout); bucket (W, H); files [B targets].

    Epoch e, with a RNG seeded by (seed, e): the samples (each repeats + 1 times) are shuffled within their
    bucket and cut into global batches of batch_size x world_size; a smaller remainder is dropped, so every
    step has full, equal batches on every rank (the shuffle drops different ones each epoch). The global
    batches are shuffled; rank r takes the r-th slice of each, so all ranks share a bucket at every step.
    Iteration runs on through epochs; state_dict() is the position of the next batch."""

    def __init__(
        self, samples: list[Sample], batch_size: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        assert 0 <= rank < world_size and batch_size >= 1, (rank, world_size, batch_size)
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.rank, self.world = rank, world_size
        self.groups: dict[tuple[bool, int, int], list[int]] = {}  # (edit?, W, H) -> sample indices
        for i, s in enumerate(samples):
            assert s.entries, f"{s.target}: run build_caches on the samples first"
            self.groups.setdefault((s.reference is not None, *s.bucket), []).append(i)
        self.epoch, self.index = 0, 0
        if len(self) == 0:
            sizes = {f"{w}x{h}": len(g) for (_, w, h), g in self.groups.items()}
            raise DataError([f"no bucket fills a batch of {batch_size} x {world_size} GPUs; sizes: {sizes}"])

    def __len__(self) -> int:
        step = self.batch_size * self.world
        return sum(sum(self.samples[i].repeats + 1 for i in g) // step for g in self.groups.values())

    def plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's global batches, each a list of (sample index, caption variant)."""
        rng, step, batches = random.Random(f"minicat-{self.seed}-{epoch}"), self.batch_size * self.world, []
        for key in sorted(self.groups):
            items = [i for i in self.groups[key] for _ in range(self.samples[i].repeats + 1)]
            rng.shuffle(items)
            items = [(i, rng.randrange(len(self.samples[i].captions))) for i in items]
            batches += [items[k : k + step] for k in range(0, len(items) - step + 1, step)]
        rng.shuffle(batches)
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch yielded before state_dict(); call before iterating."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def load(self, items: list[tuple[int, int]]) -> dict:
        """One rank's batch from the cache files: a list of (sample index, caption variant)."""
        rows = [(self.samples[i], v) for i, v in items]
        stack = lambda entry, key: torch.stack([load_file(entry(s, v))[key] for s, v in rows])
        edit = rows[0][0].reference is not None
        return {
            "target": stack(lambda s, v: s.entries["target"], "latent"),  # (B, 16, h, w)
            "reference": stack(lambda s, v: s.entries["reference"], "latent")
            if edit
            else None,  # (B, 16, h, w)
            "text": stack(lambda s, v: s.entries["texts"][v], "text"),  # (B, L, D)
            "text_empty": stack(lambda s, v: s.entries["empty"], "text"),  # (B, L, D)
            "bucket": rows[0][0].bucket,
            "files": [str(s.target) for s, _ in rows],
        }

    def __iter__(self) -> Iterator[dict]:
        while True:
            batches = self.plan(self.epoch)
            while self.index < len(batches):
                items = batches[self.index]
                self.index += 1  # before yielding, so a state_dict() taken after a batch points past it
                yield self.load(items[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
            self.epoch, self.index = self.epoch + 1, 0


# ----------------------------------------------------------------------------------------------------------
# CLI: python data.py config.toml


def model_identity(path: Path) -> str:
    """What cache entries depend on in a checkpoint: its folder, its small files (configs, tokenizer) by
    content, and the VAE and text-encoder weights by file name and size (hashing 16 GB a run is too slow)."""
    h, parts = hashlib.sha256(), ("vae", "text_encoder", "tokenizer", "text_processor")
    files = sorted(p for d in parts for p in (path / d).glob("*") if p.is_file())
    for p in sorted(path.glob("*.json")) + files:
        body = b"" if p.suffix in (".safetensors", ".bin") else p.read_bytes()
        h.update(f"{p.relative_to(path)}:{p.stat().st_size}\n".encode() + body)
    return f"{path.resolve()}#{h.hexdigest()[:16]}"


def _run(config: Path) -> None:
    cfg = tomllib.loads(config.read_text(encoding="utf-8"))
    datasets = parse_datasets(cfg.get("datasets"), config.parent, cfg.get("aspect_bucket_alignment", 64))
    samples = scan(datasets)  # every data problem surfaces here, before a checkpoint is touched
    import model  # only the CLI needs a model; the functions above take encoders as arguments

    name = cfg.get("pretrained_model_name_or_path", DEFAULT_CHECKPOINT)
    local = config.parent / Path(name).expanduser()  # relative to the config, like the dataset paths
    ckpt = model.resolve_checkpoint(local if local.exists() else name)
    flavour = model.read_flavour(ckpt)
    wrong = [d.id for d in datasets if d.role != "reference" and (d.role == "edit") != (flavour == "edit")]
    if wrong:
        why = "edit sets (with conditioning_data) need LongCat-Image-Edit, t2i sets LongCat-Image"
        raise DataError([f"dataset(s) {', '.join(wrong)} do not fit the {flavour} checkpoint {ckpt}: {why}"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    loaded = {}  # each encoder loads at its first miss, so a complete cache loads nothing

    def encode_latents(x: torch.Tensor) -> torch.Tensor:
        if "vae" not in loaded:
            loaded["vae"] = model.load_vae(ckpt, dtype, device)
        return model.to_latent(loaded["vae"], x.to(device, dtype)).cpu()

    def encode_text(prompt: str, ref: Image.Image | None) -> torch.Tensor:
        if "te" not in loaded:
            loaded["te"] = model.load_text_encoder(ckpt, dtype, device)
        return loaded["te"].encode(prompt, ref).cpu()

    dtype_name = str(dtype).removeprefix("torch.")
    report = build_caches(
        datasets, encode_latents, encode_text, model_identity(ckpt), dtype_name, samples=samples
    )
    loaded.clear()  # free the encoders
    if device == "cuda":
        torch.cuda.empty_cache()
    print(report.summary())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the datasets of a config and build their caches.")
    parser.add_argument("config", type=Path, help="training config (TOML) with [[datasets]]")
    args = parser.parse_args(argv)
    try:
        _run(args.config)
    except DataError as e:
        print("\n".join(f"error: {p}" for p in e.problems), file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad TOML, no config file, checkpoint not found: no traceback needed
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
