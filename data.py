"""Datasets for minicat: SimpleTuner-style `[[datasets]]` config, image reading, aspect buckets,
latent and text-embedding caches, and a resumable bucketed loader.

An edit dataset (captions = instructions) names its reference dataset in `conditioning_data`; files
pair by their path inside the folder minus the extension (folders are searched recursively, hidden
ones skipped). Both images of a pair are resized (cover, Lanczos) and centre-cropped into the bucket
nearest the *target's* aspect ratio, so a reference never gets a size of its own or a W/H swap and
batches > 1 stack (ostris/ai-toolkit#487, #707). A dataset that names no reference and is named by
none is text-to-image. Buckets follow the official recipe's 64-px tables: area ~ resolution², aspect
0.5-2 (meituan-longcat/LongCat-Image train_examples, its bucket tables). As in SimpleTuner, captions
on the reference set are optional and, when present, replace the edit set's (a warning says so).

Images are read one way everywhere (`load_rgb`: EXIF rotation applied, transparency composited on
white, size-limited before decoding) and become tensors one way (`pil_to_tensor`, diffusers'
arithmetic), so a validation reference and a training image of the same file give the same latent.

Cache entries are safetensors files named by the sha256 of everything they depend on (image bytes,
bucket, model identity, dtype, the text encoder's precision, CACHE_VERSION), so a changed image,
bucket, model or precision is a miss, never a stale hit. Latents are stored float32 [16, H/8, W/8];
text embeddings [L, D] in the encoder's dtype (~50x larger). An edit embedding sees the reference,
so it is keyed by (instruction, reference bytes, bucket), and every reference also gets the empty
instruction for caption dropout, encoded with the real reference as the official recipe does
(LongCat-Image train_examples/edit_lora). Every entry is read in full and checked (shape, finite
values) before it is used; a bad one is named and made again. Writes go to `<name>.tmp-<pid>`, then
os.replace, so a killed run leaves no half entry under a real name. All latents are encoded before
any text, so the VAE and the text encoder need not be on the GPU together. Dataset folders are only
ever read.

Checks run before any encoder call and name every offender at once; skipped files are reported.
`python data.py config.toml` is train.py stopping once the data is checked and cached, with a
report.
"""

import difflib
import hashlib
import json
import math
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm import tqdm

import config
import files
import images
import model as M
import pipeline
import quant

CACHE_VERSION = (
    "minicat-data-2"  # bump when this file changes what an entry holds: all entries then miss
)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
LATENT_CHANNELS, VAE_FACTOR = 16, 8  # the FLUX.1 VAE: 16 latent channels, 8x down
TOKEN_PX = 2 * VAE_FACTOR  # one transformer token: 2 x 2 latents, 16 x 16 pixels


class DataError(ValueError):
    """Problems with the config or the data, one self-contained line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --------------------------------------------------------------------------------------------------
# Config: SimpleTuner's key names, checked strictly


@dataclass
class DatasetConfig:
    id: str
    instance_data_dir: Path
    cache_dir_vae: Path
    cache_dir_text: Path  # default: a `text` folder beside cache_dir_vae
    resolution: int = (
        1024  # bucket area = resolution² px (SimpleTuner's pixel_area); not for references
    )
    alignment: int = 64  # the config's top-level aspect_bucket_alignment
    caption_strategy: str | None = None  # textfile | filename | instanceprompt | None
    instance_prompt: str | None = None
    conditioning_data: list[str] = field(default_factory=list)  # reference dataset ids, in order
    repeats: int = 0  # extra appearances of each sample per epoch (0: once)
    role: str = "t2i"  # "edit", "reference", "mask" or "t2i": derived from conditioning_data
    # masked loss (issue 21): a mask set is named in conditioning_data with conditioning_type "mask"
    conditioning_type: str | None = None
    mask: str | None = None  # "difference": weights from where target and first reference differ
    mask_threshold: int = 16  # a pixel differs when a channel moves by more than this (of 255)
    mask_dilation: int = 16  # grow the differing region by this many pixels
    mask_floor: float = 0.1  # the weight outside it (0: no gradient there)
    given: frozenset[str] = frozenset()  # the keys the config wrote, to name those with no effect


KEYS = {
    "id": str,
    "type": str,
    "dataset_type": str,
    "disabled": bool,
    "instance_data_dir": str,
    "caption_strategy": str,
    "instance_prompt": str,
    "resolution": int,
    "resolution_type": str,
    "cache_dir_vae": str,
    "cache_dir_text": str,
    "conditioning_data": (str, list),
    "conditioning_type": str,
    "repeats": int,
    "mask": str,
    "mask_threshold": int,
    "mask_dilation": int,
    "mask_floor": float,
}
CHOICES = {
    "type": ["local"],
    "dataset_type": ["image", "conditioning"],
    "resolution_type": ["pixel_area"],
    "caption_strategy": ["textfile", "filename", "instanceprompt", "none"],
    "conditioning_type": ["reference_strict", "reference_loose", "mask"],
    "mask": ["difference"],
}
REQUIRED = ("id", "instance_data_dir", "cache_dir_vae")


def _key_problems(entry: dict, where: str) -> list[str]:
    out = [f"{where}: missing {k}" for k in REQUIRED if k not in entry]
    for key, value in entry.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            out.append(
                f"{where}: unknown key '{key}'"
                + (f" (did you mean '{close[0]}'?)" if close else "")
            )
            continue
        strings = not isinstance(value, list) or all(isinstance(v, str) for v in value)
        if (
            not isinstance(value, KEYS[key])
            or (KEYS[key] is int and isinstance(value, bool))
            or not strings
        ):
            want = "a list of dataset ids" if key == "conditioning_data" else KEYS[key].__name__
            out.append(f"{where}: {key} should be {want}, got {value!r}")
        elif key in CHOICES and value not in CHOICES[key]:
            out.append(f"{where}: {key} = {value!r} is not supported (use one of {CHOICES[key]})")
        elif key in ("resolution", "repeats") and not (
            0 <= value <= (16384 if key == "resolution" else 10**6)
        ):
            out.append(f"{where}: {key} = {value} is out of range")
    return out


def _parse_entry(e: dict, where: str, base_dir: Path, alignment: int) -> DatasetConfig:
    def path(v: str) -> Path:
        return (base_dir / Path(v).expanduser()).resolve()  # an absolute v replaces base_dir

    cond = e.get("conditioning_data", [])
    cond = [cond] if isinstance(cond, str) else cond
    vae, text = path(e["cache_dir_vae"]), e.get("cache_dir_text")
    ds = DatasetConfig(
        e["id"], path(e["instance_data_dir"]), vae, path(text) if text else vae.parent / "text"
    )
    ds.resolution, ds.alignment, ds.repeats = (
        e.get("resolution", 1024),
        alignment,
        e.get("repeats", 0),
    )
    ds.caption_strategy = (
        None if e.get("caption_strategy") in (None, "none") else e["caption_strategy"]
    )
    ds.instance_prompt, ds.conditioning_data = e.get("instance_prompt"), cond
    ds.conditioning_type, ds.mask = e.get("conditioning_type"), e.get("mask")
    ds.mask_threshold = e.get("mask_threshold", ds.mask_threshold)
    ds.mask_dilation = e.get("mask_dilation", ds.mask_dilation)
    ds.mask_floor = e.get("mask_floor", ds.mask_floor)
    ds.given = frozenset(e)
    if ds.resolution < alignment:
        raise DataError([f"{where}: resolution {ds.resolution} must be at least {alignment}"])
    return ds


def _unused_keys(datasets: list[DatasetConfig]) -> list[str]:
    """A line per dataset key that has no effect where it is (a reference set's own repeats or
    size, an instance_prompt beside another caption_strategy, mask settings without mask)."""
    lines = []
    for ds in datasets:
        where = f"dataset '{ds.id}'"
        if ds.role in ("reference", "mask"):
            users = [d for d in datasets if ds.id in d.conditioning_data]
            if "repeats" in ds.given and ds.repeats:
                lines.append(f"{where}: repeats is not used: a {ds.role} follows its target's")
            sizes = {d.resolution for d in users}
            if "resolution" in ds.given and sizes and ds.resolution not in sizes:
                lines.append(
                    f"{where}: resolution {ds.resolution} is not used: a {ds.role} is fitted into "
                    f"its target's bucket (resolution {', '.join(map(str, sorted(sizes)))})"
                )
        if "instance_prompt" in ds.given and ds.caption_strategy != "instanceprompt":
            lines.append(
                f"{where}: instance_prompt is not used: caption_strategy is "
                f"{ds.caption_strategy!r} (set it to 'instanceprompt' to use it)"
            )
        knobs = sorted(
            k for k in ("mask_threshold", "mask_dilation", "mask_floor") if k in ds.given
        )
        if knobs and ds.mask != "difference":
            lines.append(f"{where}: {', '.join(knobs)} not used: they tune mask = 'difference'")
    return lines


def parse_datasets(
    entries: object, base_dir: Path, alignment: object = 64, notes: list[str] | None = None
) -> list[DatasetConfig]:
    """The config's `[[datasets]]` list -> checked DatasetConfigs; relative paths are relative to
    base_dir. `notes` hears the keys that have no effect."""
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment % 16
    ):
        raise DataError(
            [f"aspect_bucket_alignment must be a positive multiple of 16, got {alignment!r}"]
        )
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise DataError(["the config needs [[datasets]] tables"])
    problems, datasets, disabled = [], [], set()
    for n, e in enumerate(entries):
        e = {
            k: v for k, v in e.items() if v is not None
        }  # a JSON null (SimpleTuner's configs) means unset
        where = f"dataset '{e['id']}'" if isinstance(e.get("id"), str) else f"datasets[{n}]"
        try:
            if found := _key_problems(e, where):
                raise DataError(found)
            if not e.get("disabled"):
                datasets.append(_parse_entry(e, where, base_dir, alignment))
            else:
                disabled.add(e.get("id"))
        except DataError as err:
            problems += err.problems
    if problems:  # before the cross-checks, which would only echo these
        raise DataError(problems)
    _link_roles(datasets, disabled)
    if notes is not None:
        notes += _unused_keys(datasets)
    return datasets


def _mask_problems(ds: DatasetConfig, conds: list[DatasetConfig], where: str) -> list[str]:
    """What is wrong with a dataset's masked-loss settings (issue 21)."""
    out, masks = [], [c.id for c in conds if c.role == "mask"]
    if len(masks) > 1:
        out.append(f"{where}: conditioning_data names {len(masks)} mask datasets; name one")
    if ds.mask == "difference" and masks:
        out.append(f"{where}: mask = 'difference' and a mask dataset; choose one")
    if ds.mask == "difference" and not any(c.role == "reference" for c in conds):
        out.append(f"{where}: mask = 'difference' needs a reference dataset in conditioning_data")
    if not 0 <= ds.mask_threshold <= 255:
        out.append(f"{where}: mask_threshold = {ds.mask_threshold} must be in [0, 255]")
    if not 0 <= ds.mask_dilation <= 1024:
        out.append(f"{where}: mask_dilation = {ds.mask_dilation} must be in [0, 1024] pixels")
    if not (math.isfinite(ds.mask_floor) and 0 <= ds.mask_floor <= 1):
        out.append(f"{where}: mask_floor = {ds.mask_floor} must be in [0, 1]")
    return out


def _link_roles(datasets: list[DatasetConfig], disabled: set = frozenset()) -> None:
    """Mark edit, reference and mask sets from conditioning_data and check what each role needs
    (`disabled`: the ids of disabled sets, named as such when another set needs one)."""
    ids, by_id, problems = [d.id for d in datasets], {d.id: d for d in datasets}, []
    problems += [
        f"dataset '{i}': the id is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})
    ]
    for ds in datasets:
        if len(set(ds.conditioning_data)) < len(ds.conditioning_data):
            problems.append(f"dataset '{ds.id}': conditioning_data names a dataset twice")
        for cond in ds.conditioning_data:
            if cond == ds.id:
                problems.append(f"dataset '{ds.id}': conditioning_data names the dataset itself")
            elif cond in by_id and by_id[cond].conditioning_type == "mask":
                by_id[cond].role = "mask"
            elif cond in by_id:
                ds.role, by_id[cond].role = "edit", "reference"
            elif cond in disabled:
                problems.append(
                    f"dataset '{ds.id}': conditioning_data names dataset '{cond}', which is "
                    "disabled: enable it, or disable this one too"
                )
            else:
                close = difflib.get_close_matches(cond, ids, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"ids: {', '.join(ids)}"
                problems.append(
                    f"dataset '{ds.id}': conditioning_data: no dataset '{cond}' ({hint})"
                )
    if problems:  # the roles below would be guesses
        raise DataError(problems)
    for ds in datasets:
        where = f"dataset '{ds.id}'"
        if ds.role in ("reference", "mask") and ds.conditioning_data:
            problems.append(
                f"{where}: a {ds.role} dataset cannot have conditioning_data of its own"
            )
        refs = [by_id[c] for c in ds.conditioning_data if by_id[c].role == "reference"]
        problems += _mask_problems(ds, [by_id[c] for c in ds.conditioning_data], where)
        if (
            ds.role not in ("reference", "mask")
            and not ds.caption_strategy
            and not any(r.caption_strategy for r in refs)
        ):
            what = (
                "its instructions"
                if ds.role == "edit"
                else "captions (or conditioning_data for edits)"
            )
            problems.append(f"{where}: needs a caption_strategy for {what}")
        if ds.caption_strategy == "instanceprompt" and not ds.instance_prompt:
            problems.append(f"{where}: caption_strategy 'instanceprompt' needs instance_prompt")
        for d in (
            datasets
        ):  # a cache inside an image folder would break the promise never to write there
            for cache in sorted({ds.cache_dir_vae, ds.cache_dir_text}):
                if cache.is_relative_to(d.instance_data_dir):
                    problems.append(
                        f"{where}: cache folder {cache} is inside the images of '{d.id}'"
                    )
    if problems:
        raise DataError(problems)


# --------------------------------------------------------------------------------------------------
# Images: read one way, turned into tensors one way; buckets


def make_buckets(resolution: int, alignment: int = 64) -> list[tuple[int, int]]:
    """(W, H) on the alignment grid, from tall to wide: for each W the H with W·H closest to
    resolution², aspect within 0.5-2, and each bucket's transpose too, so portrait and landscape get
    the same choices."""
    out, area = set(), resolution * resolution
    for w in range(alignment, 2 * resolution + alignment, alignment):
        h = max(alignment, round(area / w / alignment) * alignment)
        if 0.5 <= w / h <= 2:
            out |= {(w, h), (h, w)}
    return sorted(out, key=lambda b: b[0] / b[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio, so 2:1 and 1:2 are equally far from 1:1."""
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(size[0] / size[1])))


# --------------------------------------------------------------------------------------------------
# Scanning: pairs, captions, buckets, all checked before any model work


@dataclass
class Sample:
    dataset: str
    target: Path
    references: list[Path]  # in conditioning_data's order, those found; []: text-to-image
    captions: list[str]  # variants (textfile lines, as SimpleTuner); one is drawn per epoch
    repeats: int = 0
    size: tuple[int, int] = (0, 0)  # target (W, H) after EXIF rotation
    bucket: tuple[int, int] = (0, 0)  # (W, H) of the target and every reference alike
    target_hash: str = ""
    reference_hashes: list[str] = field(default_factory=list)
    reference_sets: list[str] = field(default_factory=list)  # the dataset id of each reference
    mask: Path | None = None  # the mask image of the same name, from the mask set
    mask_hash: str = ""
    entries: dict = field(default_factory=dict)  # by build_caches: target, references, texts, empty

    @property
    def reference(self) -> Path | None:
        """The first reference (the official single-reference edit), or None."""
        return self.references[0] if self.references else None


def _list_images(ds: DatasetConfig, notes: list[str]) -> dict[str, list[Path]]:
    """{path inside the folder without extension: [image files]}. What is left out is noted: files
    that are not images, hidden images, captions beside no image, linked folders (not followed)."""
    files, skipped, hidden, texts, links = {}, [], [], [], []
    for p in sorted(ds.instance_data_dir.rglob("*")):
        rel = p.relative_to(ds.instance_data_dir)
        if any(s.startswith(".") for s in rel.parts):
            if p.suffix.lower() in IMAGE_EXTS and p.is_file():
                hidden.append(rel.as_posix())
        elif p.is_symlink() and p.is_dir():
            links.append(rel.as_posix())
        elif not p.is_file():
            continue
        elif p.suffix.lower() in IMAGE_EXTS:
            files.setdefault(rel.with_suffix("").as_posix(), []).append(p)
        elif p.suffix.lower() == ".txt":
            texts.append(rel.with_suffix("").as_posix())
        else:
            skipped.append(rel.as_posix())
    lonely = [f"{t}.txt" for t in texts if t not in files]
    exts = "/".join(sorted(IMAGE_EXTS))
    for names, what in (
        (skipped, f"file(s) that are not {exts}"),
        (hidden, "hidden image(s) (a name or folder starting with '.')"),
        (lonely, "caption(s) beside no image of the same name"),
        (links, "linked folder(s), not followed (link the files, or copy the folder)"),
    ):
        if names:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            notes.append(f"dataset '{ds.id}': skipped {len(names)} {what}: {shown}")
    return files


def _captions(ds: DatasetConfig, path: Path) -> list[str]:
    if ds.caption_strategy is None:
        return []
    if ds.caption_strategy == "instanceprompt":
        return [ds.instance_prompt]
    if ds.caption_strategy == "filename":
        return [c] if (c := path.stem.replace("_", " ").strip()) else []
    try:
        text = path.with_suffix(".txt").read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):  # reported with the missing ones (_no_caption says why)
        return []
    if CONTROL.search(text):  # NULs: UTF-16 without a BOM reads as "m\0a\0k\0e" in UTF-8
        return []
    return _caption_lines(text)


def _caption_lines(text: str) -> list[str]:
    """One caption per non-empty line, as SimpleTuner: split at "\n" only (str.splitlines also
    splits at U+2028, \x85 ...)."""
    return [s.strip() for s in text.split("\n") if s.strip()]


CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # control characters no caption holds


def _no_caption(ds: DatasetConfig, path: Path) -> str:
    """Why an image has no caption, for the report."""
    if ds.caption_strategy != "textfile":
        return "none"
    txt = path.with_suffix(".txt")
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return f"no {txt.name}"
    except OSError as e:
        return f"{txt.name} unreadable: {e.strerror or e}"
    except UnicodeDecodeError:
        return f"{txt.name} is not UTF-8"
    if CONTROL.search(text):
        return f"{txt.name} holds NUL or control characters (UTF-16 without a BOM?)"
    return f"{txt.name} is empty"


def _inspect(path: Path) -> tuple[str, tuple[int, int]] | str:
    """(sha256, (W, H)) of a fully decoded image, or the problem."""
    try:
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), images.load_rgb(path, data).size
    except images.ImageError as e:
        return str(e)
    except OSError as e:
        return f"{path}: cannot read ({e})"


def _pair(
    ds: DatasetConfig, listing: dict, by_id: dict, notes: list[str]
) -> tuple[list[Sample], list[str]]:
    """The samples of one edit or t2i set, and its problems (no target with a reference, missing
    captions). A target keeps the references found under its name, in conditioning_data's order; one
    with none trains as text-to-image on the edit model (ai-toolkit#480), and is noted."""
    ref_sets = [by_id[c] for c in ds.conditioning_data if by_id[c].role == "reference"]
    mask_set = next((by_id[c] for c in ds.conditioning_data if by_id[c].role == "mask"), None)
    samples, orphans, uncaptioned, unmasked = [], [], [], []
    for stem, (path, *_) in listing[ds.id].items():
        found = [(r, listing[r.id][stem][0]) for r in ref_sets if stem in listing[r.id]]
        # the seed: captions on the reference set, where a file has one, replace the edit set's
        on_refs = (c for r, ref in found if r.caption_strategy and (c := _captions(r, ref)))
        captions = next(on_refs, []) or _captions(ds, path)
        name = path.relative_to(ds.instance_data_dir).as_posix()
        if ref_sets and not found:
            orphans.append(name)
        if not captions:
            uncaptioned.append(f"{name} ({_no_caption(ds, path)})")
        else:
            refs = [ref for _, ref in found]
            sample = Sample(ds.id, path, refs, captions, ds.repeats)
            sample.reference_sets = [r.id for r, _ in found]
            if mask_set is not None and stem in listing[mask_set.id]:
                sample.mask = listing[mask_set.id][stem][0]
            elif mask_set is not None:
                unmasked.append(name)
            samples.append(sample)
    problems = []
    if orphans:
        where = " or ".join(str(r.instance_data_dir) for r in ref_sets)
        names = f"{len(orphans)} image(s): {', '.join(orphans)}"
        line = f"dataset '{ds.id}': no reference of the same name in {where} for {names}"
        if len(orphans) == len(listing[ds.id]):  # surely a wrong folder, not a t2i mix
            problems.append(line)
        else:
            notes.append(f"{line}: trained as text-to-image")
    if unmasked:
        where = mask_set.instance_data_dir
        problems.append(
            f"dataset '{ds.id}': no mask of the same name in {where} for {len(unmasked)} image(s): "
            + ", ".join(unmasked)
        )
    if uncaptioned:
        problems.append(
            f"dataset '{ds.id}': {len(uncaptioned)} without a caption: {', '.join(uncaptioned)}"
        )
    for ref_ds in ref_sets:
        if unused := sorted(set(listing[ref_ds.id]) - set(listing[ds.id])):
            names = (
                f"{len(unused)} reference(s) without an edit image, skipped: {', '.join(unused)}"
            )
            notes.append(f"dataset '{ref_ds.id}': {names}")
        if ref_ds.caption_strategy:
            rule = (
                "SimpleTuner's rule; usually unwanted: drop its caption_strategy to keep the "
                "instructions"
            )
            notes.append(
                f"dataset '{ref_ds.id}' has captions: they replace those of '{ds.id}' ({rule})"
            )
    return samples, problems


def scan(datasets: list[DatasetConfig], notes: list[str] | None = None) -> list[Sample]:
    """Every training sample, checked: pairs complete, captions present, every image decodes. Raises
    DataError naming every offender (cheap checks first); what is skipped is added to `notes`."""
    by_id, problems, samples, listing = {d.id: d for d in datasets}, [], [], {}
    notes = [] if notes is None else notes
    for ds in datasets:
        if not ds.instance_data_dir.is_dir():
            problems.append(
                f"dataset '{ds.id}': instance_data_dir {ds.instance_data_dir} is not a folder"
            )
            continue
        listing[ds.id] = files = _list_images(ds, notes)
        if not files:
            problems.append(
                f"dataset '{ds.id}': no {'/'.join(sorted(IMAGE_EXTS))} in {ds.instance_data_dir}"
            )
        for ps in (ps for ps in files.values() if len(ps) > 1):
            problems.append(f"dataset '{ds.id}': {', '.join(p.name for p in ps)} share a name")
    if problems:
        raise DataError(problems)
    for ds in (d for d in datasets if d.role not in ("reference", "mask")):
        found, bad = _pair(ds, listing, by_id, notes)
        samples, problems = samples + found, problems + bad
    if problems:
        raise DataError(problems)
    paths = sorted({p for s in samples for p in (s.target, *s.references, s.mask) if p})
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        info = dict(zip(paths, pool.map(_inspect, paths), strict=True))
    if problems := [v for v in info.values() if isinstance(v, str)]:
        raise DataError(problems)
    for s in samples:
        ds = by_id[s.dataset]
        s.target_hash, s.size = info[s.target]
        s.reference_hashes = [info[r][0] for r in s.references]
        s.mask_hash = info[s.mask][0] if s.mask else ""
        s.bucket = nearest_bucket(s.size, make_buckets(ds.resolution, ds.alignment))
    notes.extend(cut_notes(samples, {p: v[1] for p, v in info.items()}))
    return samples


# A crop that keeps less of an image than this, or a resize by more than this factor between a
# reference and its target, is reported: beyond it the model trains on something else than the file.
KEPT_AT_LEAST = 0.8
RESIZED_AT_MOST = 2.0


def kept_share(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """The share of an image of `size` that a cover-and-centre-crop into `bucket` keeps."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)  # cover: the smaller side fills the bucket
    return (bw * bh) / (w * scale * h * scale)


def cut_notes(samples: list[Sample], sizes: dict[Path, tuple[int, int]]) -> list[str]:
    """One line per image that its bucket crops beyond KEPT_AT_LEAST (an extreme aspect ratio),
    and per reference whose shape differs from its target's enough to be cropped beyond it or
    scaled by more than RESIZED_AT_MOST, naming the file."""
    notes = []
    for s in samples:
        share = kept_share(s.size, s.bucket)
        if share < KEPT_AT_LEAST:
            w, h = s.size
            bw, bh = s.bucket
            notes.append(
                f"{s.target}: {w}x{h} is cropped to its {bw}x{bh} bucket, keeping "
                f"{share:.0%} of it (the aspect ratios of buckets run from 1:2 to 2:1)"
            )
        tw, th = s.size
        bw, bh = s.bucket
        target_scale = max(bw / tw, bh / th)
        for ref in s.references:
            w, h = sizes[ref]
            share = kept_share((w, h), s.bucket)
            # how much more (or less) the reference is scaled than its target
            factor = max(bw / w, bh / h) / target_scale
            if share < KEPT_AT_LEAST or max(factor, 1 / factor) > RESIZED_AT_MOST:
                notes.append(
                    f"{ref}: the reference is {w}x{h} but its target {s.target.name} is {tw}x{th};"
                    f" fitted to the {bw}x{bh} bucket it keeps {share:.0%} of itself and is "
                    f"scaled {factor:.2g}x as much as the target"
                )
    return capped(notes, "cut or rescaled so")


def capped(lines: list[str], what: str, at: int = 20) -> list[str]:
    """The first `at` of many like lines, and a count of the rest (a report stays readable)."""
    if len(lines) <= at:
        return lines
    return lines[:at] + [f"... and {len(lines) - at} more images {what} (the first {at} above)"]


# --------------------------------------------------------------------------------------------------
# Caches


def entry_name(*parts: str) -> str:
    """A cache entry's file name: the sha256 of everything its tensor depends on."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest() + ".safetensors"


def read_entry(path: Path, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """An entry's tensor, read in full and checked (ours, the expected shape, finite); DataError
    otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + n]).get("__metadata__", {}) if 8 < 8 + n <= len(raw) else {}
        tensor = load_file(path)[key] if meta.get("format") == CACHE_VERSION else None
    except (OSError, SafetensorError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError([f"cache entry {path}: unreadable ({type(e).__name__})"]) from None
    if tensor is None:
        raise DataError([f"cache entry {path}: not a {CACHE_VERSION} entry"])
    if (shape is not None and tuple(tensor.shape) != shape) or tensor.ndim != (
        3 if key == "latent" else 2
    ):
        raise DataError(
            [f"cache entry {path}: shape {tuple(tensor.shape)}, expected {shape or '[L, D]'}"]
        )
    if not torch.isfinite(tensor).all():
        raise DataError([f"cache entry {path}: holds NaN or inf"])
    return tensor


def _write(path: Path, key: str, tensor: torch.Tensor, metadata: dict[str, str]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(
                save(
                    {key: tensor.detach().cpu().contiguous()}, {**metadata, "format": CACHE_VERSION}
                )
            )
            f.flush()
            os.fsync(f.fileno())

    files.write_atomic(path, write, "the cache entry ")


def _load_fitted(path: Path, sha: str, bucket: tuple[int, int]) -> Image.Image:
    """The image in its bucket, refusing a file edited since the scan (its entries carry the old
    bytes)."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise DataError([f"{path} changed while caching; run again"])
    return images.fit(images.load_rgb(path, data), bucket)


@dataclass
class Report:
    samples: list[Sample]
    buckets: Counter  # (dataset id, W, H) -> pairs
    hits: int = 0  # distinct entries found valid
    misses: int = 0  # distinct entries (re)written
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{len(self.samples)} samples; cache entries: {self.hits} reused, {self.misses} written"
        ]
        lines += [f"  {ds} {w}x{h}: {n}" for (ds, w, h), n in sorted(self.buckets.items())]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def plan_entries(
    samples: list[Sample], datasets: list[DatasetConfig], model_id: str, dtype: str, te: str
) -> None:
    """Name every sample's entries (s.entries): latents by image, bucket, model and dtype; texts by
    caption, (every reference, bucket) for edits, model, dtype and the text encoder's precision `te`.
    One reference gives the names it always had; each reference's latent lives in its own set's
    cache."""
    by_id = {d.id: d for d in datasets}
    for s in samples:
        ds, (w, h) = by_id[s.dataset], s.bucket
        ctx = (
            [*s.reference_hashes, f"{w}x{h}"] if s.references else []
        )  # t2i text depends on the text alone
        latent, text = [f"{w}x{h}", model_id, dtype], [*ctx, model_id, dtype, te]
        s.entries = {
            "target": ds.cache_dir_vae / entry_name("latent", s.target_hash, *latent),
            "texts": [ds.cache_dir_text / entry_name("text", c, *text) for c in s.captions],
            "empty": ds.cache_dir_text / entry_name("text", "", *text),
        }
        s.entries["references"] = [
            by_id[d].cache_dir_vae / entry_name("latent", sha, *latent)
            for d, sha in zip(s.reference_sets, s.reference_hashes, strict=True)
        ]
        # loss weights on the token grid: by the mask image and bucket, or by what they derive from
        if s.mask:
            mask_set = next(by_id[c] for c in ds.conditioning_data if by_id[c].role == "mask")
            s.entries["mask"] = mask_set.cache_dir_vae / entry_name("mask", s.mask_hash, f"{w}x{h}")
        elif ds.mask == "difference" and s.references:
            knobs = [ds.mask_threshold, ds.mask_dilation, ds.mask_floor]
            derived = ["difference", s.target_hash, s.reference_hashes[0], f"{w}x{h}", *knobs]
            s.entries["mask"] = ds.cache_dir_vae / entry_name("mask", *derived)


def _check_entries(samples: list[Sample], report: Report) -> dict[Path, bool]:
    """{entry: valid} for every planned entry, read in full (threads: reading and isfinite drop
    the GIL)."""
    jobs = {}
    for s in samples:
        shape = (LATENT_CHANNELS, s.bucket[1] // VAE_FACTOR, s.bucket[0] // VAE_FACTOR)
        jobs.update({p: ("latent", shape) for p in [s.entries["target"], *s.entries["references"]]})
        if "mask" in s.entries:
            jobs[s.entries["mask"]] = ("mask", (s.bucket[1] // TOKEN_PX, s.bucket[0] // TOKEN_PX))
        jobs.update({p: ("text", None) for p in [*s.entries["texts"], s.entries["empty"]]})

    def check(item) -> bool:
        path, (key, shape) = item
        if not path.exists():
            return False
        try:
            read_entry(path, key, shape)
            return True
        except DataError as e:
            report.warnings.append(f"{e.problems[0]}: made again")
            return False

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(jobs, pool.map(check, jobs.items()), strict=True))


def build_caches(
    datasets: list[DatasetConfig],
    encode_latents: Callable[[torch.Tensor], torch.Tensor] | None,
    encode_text: Callable[[str, Image.Image | None], torch.Tensor] | None,
    model_id: str,
    dtype_name: str,
    text_precision: str = "none",
    progress: bool = True,
    samples: list[Sample] | None = None,
    notes: list[str] | None = None,
) -> Report:
    """Write every missing or bad cache entry, reuse every valid one: all latents first, then all
    texts, so each encoder is asked for only in its own pass (and not at all when its entries are
    complete). encode_latents: [1, 3, H, W] in [-1, 1] -> [1, 16, H/8, W/8]; encode_text: (prompt,
    reference at the bucket size or None) -> [1, L, D]. With None encoders it only checks (a miss is
    an error). `samples`: a scan the caller has just run, with its `notes`."""
    notes = [] if notes is None else notes
    samples = scan(datasets, notes) if samples is None else samples
    report = Report(samples, Counter((s.dataset, *s.bucket) for s in samples), warnings=list(notes))
    plan_entries(samples, datasets, model_id, dtype_name, text_precision)
    status = _check_entries(samples, report)
    report.hits = sum(status.values())
    if encode_latents is not None and encode_text is not None:  # the writer: clear killed writes
        gone = [
            p for d in sorted({p.parent for p in status}) for p in files.remove_stale_temporaries(d)
        ]
        if gone:
            report.warnings.append(
                f"removed {len(gone)} leftover(s) of killed runs from the caches, e.g. {gone[0]}"
            )
    if not all(status.values()) and (encode_latents is None or encode_text is None):
        first = next(p for p, ok in status.items() if not ok)
        n = len(status) - report.hits
        raise DataError(
            [f"{n} cache entries are missing or bad, e.g. {first}: build them with python data.py"]
        )
    report.misses += _make_masks(samples, {d.id: d for d in datasets}, status)
    report.misses += _encode_latents(samples, status, encode_latents, progress)
    report.misses += _encode_texts(samples, status, encode_text, progress)
    weightless = [
        s
        for s in samples
        if "mask" in s.entries and not read_entry(s.entries["mask"], "mask").any()
    ]
    if weightless:
        why = "its loss mask is 0 everywhere (a black mask, or mask_floor 0 on an unchanged pair)"
        names = ", ".join(str(s.target) for s in weightless[:3])
        names += ", ..." if len(weightless) > 3 else ""
        if len(weightless) == len(samples):
            raise DataError([f"every sample trains nothing: {why}, e.g. {names}"])
        report.warnings.append(f"{len(weightless)} sample(s) train nothing: {why}: {names}")
    small = [s for s in samples if 4 * s.size[0] * s.size[1] < s.bucket[0] * s.bucket[1]]
    upscaled = [
        f"{s.target} ({s.size[0]}x{s.size[1]}) is upscaled over 2x into {s.bucket}" for s in small
    ]
    report.warnings += capped(upscaled, "upscaled over 2x")
    return report


def mask_weights(mask: Image.Image) -> torch.Tensor:
    """A mask image already fitted to its bucket (as the target is) -> loss weights [H/16, W/16]:
    the grey level (white 1: trained, black 0: not), area-averaged over each token's 16 x 16
    pixels."""
    x = (images.pil_to_tensor(mask).mean(1, keepdim=True) + 1) / 2  # (1, 1, H, W) in [0, 1]
    x = x.clamp(0, 1)  # Lanczos may ring past black and white
    return F.avg_pool2d(x, TOKEN_PX)[0, 0]  # (H/16, W/16)


def difference_weights(
    target: Image.Image, reference: Image.Image, threshold: int, dilation: int, floor: float
) -> torch.Tensor:
    """Loss weights [H/16, W/16] from where a fitted pair differs: a pixel where any channel moves
    by more than `threshold` of 255, grown by `dilation` pixels (a square max filter), area-averaged
    over each token, then floor + (1 - floor) x that, so the unchanged region keeps `floor`."""
    t, r = images.pil_to_tensor(target), images.pil_to_tensor(reference)  # (1, 3, H, W) in [-1, 1]
    moved = ((t - r).abs().amax(1, keepdim=True) * 127.5 > threshold).float()  # (1, 1, H, W)
    if dilation:
        moved = F.max_pool2d(moved, 2 * dilation + 1, stride=1, padding=dilation)
    return floor + (1 - floor) * F.avg_pool2d(moved, TOKEN_PX)[0, 0]  # (H/16, W/16)


def _make_masks(samples: list[Sample], by_id: dict, status: dict[Path, bool]) -> int:
    """Every missing mask entry (no encoder needed): a mask image or a pair's difference."""
    written = 0
    for s in (s for s in samples if not status.get(s.entries.get("mask"), True)):
        path = s.entries["mask"]
        if status[path]:  # shared by another sample and written just now
            continue
        if s.mask:
            weights, source = mask_weights(_load_fitted(s.mask, s.mask_hash, s.bucket)), s.mask
        else:
            ds = by_id[s.dataset]
            target = _load_fitted(s.target, s.target_hash, s.bucket)
            ref = _load_fitted(s.references[0], s.reference_hashes[0], s.bucket)
            knobs = (ds.mask_threshold, ds.mask_dilation, ds.mask_floor)
            weights, source = difference_weights(target, ref, *knobs), s.target
        _write(
            path,
            "mask",
            weights.float(),
            {"source": str(source), "bucket": "{}x{}".format(*s.bucket)},
        )
        status[path], written = True, written + 1
    return written


def _encode_latents(samples: list[Sample], status: dict[Path, bool], encode, progress: bool) -> int:
    """The VAE pass: every missing latent entry (an entry shared by samples is written once)."""
    todo = [
        (s, path, image, sha)
        for s in samples
        for path, image, sha in zip(
            [s.entries["target"], *s.entries["references"]],
            [s.target, *s.references],
            [s.target_hash, *s.reference_hashes],
            strict=True,
        )
        if not status[path]
    ]
    written = 0
    for s, path, image, sha in tqdm(
        todo, desc="caching latents", unit="image", disable=not (progress and todo), file=sys.stdout
    ):
        w, h = s.bucket
        if not status[path]:
            fitted = _load_fitted(image, sha, s.bucket)
            with torch.inference_mode():
                z = encode(images.pil_to_tensor(fitted))
            assert z.shape == (1, LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR), (
                z.shape,
                s.bucket,
            )
            _write(path, "latent", z[0].float(), {"source": str(image), "bucket": f"{w}x{h}"})
            status[path], written = True, written + 1
    return written


def _caption_file(s: Sample, caption: str) -> str | None:
    """Where a sample's caption was read: "X.txt (caption n)", the .txt of its target or of a
    reference (captions on a reference set replace the target's)."""
    for image in (s.target, *s.references):
        txt = image.with_suffix(".txt")
        try:
            lines = _caption_lines(txt.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError):
            continue
        if caption in lines:
            return f"{txt} (caption {lines.index(caption) + 1})"
    return None


def _encode_texts(samples: list[Sample], status: dict[Path, bool], encode, progress: bool) -> int:
    """The text-encoder pass: every missing text entry; an edit's text sees its references at
    bucket size (one image, or a list of them)."""
    todo = [
        (s, c, p)
        for s in samples
        for c, p in zip([*s.captions, ""], [*s.entries["texts"], s.entries["empty"]], strict=True)
    ]
    todo = [(s, c, p) for s, c, p in todo if not status[p]]
    ref, ref_of, written = None, None, 0
    for s, caption, path in tqdm(
        todo, desc="caching texts", unit="text", disable=not (progress and todo), file=sys.stdout
    ):
        if not status[path]:
            if s.references and ref_of is not s:
                pairs = zip(s.references, s.reference_hashes, strict=True)
                ref = [_load_fitted(r, sha, s.bucket) for r, sha in pairs]
                ref, ref_of = ref[0] if len(ref) == 1 else ref, s
            with torch.inference_mode():
                where = f"the caption of {s.target}" if caption else ""
                if caption:  # the file it came from (the target's, or a reference set's)
                    where = _caption_file(s, caption) or where
                t = encode(caption, ref if s.references else None, where)
            assert t.ndim == 3 and t.shape[0] == 1, (caption, t.shape)
            meta = {
                "source": str(s.reference or s.target),
                "bucket": "{}x{}".format(*s.bucket),
                "prompt": caption,
            }
            _write(path, "text", t[0], meta)
            status[path], written = True, written + 1
    return written


# --------------------------------------------------------------------------------------------------
# Loader


def batch_groups(samples: list[Sample]) -> dict[tuple[int, int, int], list[int]]:
    """(references, W, H) -> sample indices: a batch is drawn from one group, as every row of it
    must have the same shape and count of references. 0 and 1 sort as False and True once did."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((len(s.references), *s.bucket), []).append(i)
    return groups


def batches_per_epoch(samples: list[Sample], batch_size: int, world: int) -> int:
    """Global batches in an epoch: each group's images (with repeats) in whole batches."""
    step = batch_size * world
    groups = batch_groups(samples).values()
    return sum(sum(samples[i].repeats + 1 for i in g) // step for g in groups)


def check_batches(
    samples: list[Sample], batch_size: int, accumulation: int, world: int
) -> tuple[list[str], list[str]]:
    """(warnings, files): the samples in groups too small for one global batch (train_batch_size x
    gradient_accumulation_steps x GPUs, counting repeats) are never trained: a warning line per
    group, naming its files. No group that fills a batch stops the run, before any work."""
    need = batch_size * accumulation * world
    how = (
        f"train_batch_size {batch_size} x gradient_accumulation_steps {accumulation} x "
        f"{world} GPU(s) = {need}"
    )
    short, groups = [], batch_groups(samples)
    for (refs, w, h), group in sorted(groups.items()):
        count = sum(samples[i].repeats + 1 for i in group)
        if count < need:
            names = [str(samples[i].target) for i in group]
            short.append((f"{w}x{h} with {refs} reference(s)", count, names))
    if len(short) == len(groups):
        sizes = ", ".join(f"{where}: {count}" for where, count, _ in short)
        raise DataError(
            [
                f"no bucket fills a batch of {how}; images per bucket (with repeats): {sizes}. "
                "Lower train_batch_size or gradient_accumulation_steps, or add repeats or images"
            ]
        )
    warnings = [
        f"{len(names)} image(s) are never trained: bucket {where} holds {count} (with repeats), "
        f"a batch needs {how}. Add repeats or images of that shape, or lower the batch: "
        + ", ".join(names)
        for where, count, names in short
    ]
    return warnings, [name for _, _, names in short for name in names]


class Loader:
    """Shuffled batches from one bucket and one count of references at a time, read from the caches.
    Yields dicts: target [B, 16, h, w] f32; reference [B, 16, h, w] f32 for one reference, a list of
    K of them for K > 1, or None (t2i); text [B, L, D]; text_empty [B, L, D]
    (the empty instruction with the same reference, for caption dropout); mask [B, N] loss weights per
    target token, or None (no masked loss); bucket (W, H); files [B
    targets]; first, the place of the batch's first row in the global batch of all ranks.

    Epoch e, with a RNG seeded by (seed, e): the samples (each repeats + 1 times) are shuffled
    within their bucket and cut into global batches of batch_size x world_size; a smaller remainder
    is dropped, so every step has full, equal batches on every rank (the shuffle drops different
    ones each epoch). The global batches are shuffled; rank r takes the r-th slice of each, so all
    ranks share a bucket at every step. Iteration runs on through epochs; state_dict() is the
    position of the next batch. Every entry is checked as it is read (an entry damaged during the
    run stops it, named)."""

    def __init__(
        self,
        samples: list[Sample],
        batch_size: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        assert 0 <= rank < world_size and batch_size >= 1, (rank, world_size, batch_size)
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.rank, self.world = rank, world_size
        assert all(s.entries for s in samples), "run build_caches on the samples first"
        self.groups = batch_groups(samples)
        self.epoch, self.index = 0, 0
        if len(self) == 0:  # train.py checks first (check_batches), naming the keys
            raise DataError([f"no bucket fills a batch of {batch_size} x {world_size} GPUs"])

    def __len__(self) -> int:
        return batches_per_epoch(self.samples, self.batch_size, self.world)

    def plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's global batches, each a list of (sample index, caption variant)."""
        rng, step, batches = (
            random.Random(f"minicat-{self.seed}-{epoch}"),
            self.batch_size * self.world,
            [],
        )
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
        w, h = rows[0][0].bucket
        shape = (LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR)

        def stack(key: str, tensor: str, shape=None) -> torch.Tensor:
            paths = [s.entries[key][v] if key == "texts" else s.entries[key] for s, v in rows]
            return torch.stack([read_entry(p, tensor, shape) for p in paths])

        refs = [
            torch.stack([read_entry(s.entries["references"][k], "latent", shape) for s, _ in rows])
            for k in range(len(rows[0][0].references))
        ]  # K x (B, 16, h, w)
        mask = None  # a row without a mask weighs 1 everywhere, beside rows with one
        if any("mask" in s.entries for s, _ in rows):
            grid = (h // TOKEN_PX, w // TOKEN_PX)
            masks = [
                read_entry(s.entries["mask"], "mask", grid)
                if "mask" in s.entries
                else torch.ones(grid)
                for s, _ in rows
            ]
            mask = torch.stack(masks).flatten(1)  # (B, h/2 * w/2): the token order of M.pack
        return {
            "target": stack("target", "latent", shape),  # (B, 16, h, w)
            "reference": refs[0] if len(refs) == 1 else refs or None,
            "text": stack("texts", "text"),  # (B, L, D)
            "text_empty": stack("empty", "text"),  # (B, L, D)
            "mask": mask,  # (B, N) loss weights, or None
            "bucket": (w, h),
            "files": [str(s.target) for s, _ in rows],
        }

    def __iter__(self) -> Iterator[dict]:
        while True:
            batches = self.plan(self.epoch)
            while self.index < len(batches):
                items = batches[self.index]
                self.index += (
                    1  # before yielding, so a state_dict() taken after a batch points past it
                )
                first = (
                    self.rank * self.batch_size
                )  # this rank's rows start here in the global batch
                yield self.load(items[first : first + self.batch_size]) | {"first": first}
            self.epoch, self.index = self.epoch + 1, 0


def model_identity(path: Path) -> str:
    """What cache entries depend on in a checkpoint: its folder, its small files (configs,
    tokenizer) by content, and the VAE and text-encoder weights by file name and size (hashing 16 GB
    a run is too slow)."""
    h, parts = hashlib.sha256(), ("vae", "text_encoder", "tokenizer", "text_processor")
    files = sorted(p for d in parts for p in (path / d).glob("*") if p.is_file())
    for p in sorted(path.glob("*.json")) + files:
        body = b"" if p.suffix in (".safetensors", ".bin") else p.read_bytes()
        h.update(f"{p.relative_to(path)}:{p.stat().st_size}\n".encode() + body)
    return f"{path.resolve()}#{h.hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------------
# Before training: the data checked, the caches built, the validation inputs encoded


def read_data(cfg: config.Config, cfg_dir: Path, device) -> tuple[Path, list, list, list, list]:
    """(checkpoint, datasets, samples, notes, validation set): every data problem surfaces here,
    first, then those of the checkpoint (its folder and flavour) and of the attention kernels; no
    model is loaded."""
    notes = []
    datasets = parse_datasets(cfg.datasets, cfg_dir, cfg.aspect_bucket_alignment, notes)
    samples = scan(datasets, notes)
    ckpt = config.resolve_checkpoint(cfg.pretrained_model_name_or_path, cfg_dir)
    flavour = M.read_flavour(ckpt)
    if cfg.model_flavour and (cfg.model_flavour == "edit") != (flavour == "edit"):
        raise ValueError(
            f"model_flavour = {cfg.model_flavour!r}, but {ckpt} is a {flavour} checkpoint"
        )
    cfg.model_flavour = cfg.model_flavour or ("edit" if flavour == "edit" else "final")
    # a t2i set on the edit model trains it as text-to-image (zero references; ai-toolkit#480)
    if wrong := [d.id for d in datasets if d.role == "edit" and flavour != "edit"]:
        why = "edit sets (with conditioning_data) need LongCat-Image-Edit"
        raise DataError(
            [f"dataset(s) {', '.join(wrong)} do not fit the {flavour} checkpoint {ckpt}: {why}"]
        )
    transformer_config = M.read_transformer_config(ckpt)
    blocks = transformer_config.num_layers + transformer_config.num_single_layers
    if cfg.offload_blocks > blocks:
        raise ValueError(
            f"offload_blocks = {cfg.offload_blocks}: the transformer has {blocks} blocks"
        )
    try:
        quant.check_device(quant.normalize_mode(cfg.base_model_precision), device)
    except ValueError as e:
        raise ValueError(f"base_model_precision = {cfg.base_model_precision!r}: {e}") from None
    head_dim = transformer_config.attention_head_dim
    dtype = config.model_dtype(device, cfg.mixed_precision)
    key = "attention_backend ="
    config.check_attention(cfg.attention_backend, device, dtype, head_dim, True, key)
    if cfg.attention_backend == "cudnn":
        print(f"warning: attention_backend = 'cudnn': {config.CUDNN_NOTE}")
    return ckpt, datasets, samples, notes, validation_set(cfg, cfg_dir, samples, flavour)


def validation_set(cfg: config.Config, cfg_dir: Path, samples: list, flavour: str) -> list[dict]:
    """The validation prompts with their references, read as training reads images. Each prompt's
    validation_reference is a file, a list of files (several references, in order) or "" (none:
    text-to-image on the edit model). An edit's size keeps its first reference's aspect ratio at
    validation_resolution's area (as validate.py does), and every reference is resized to it; a t2i
    prompt gets validation_resolution itself."""
    if cfg.validation_steps == 0:
        return []
    width, height = pipeline.parse_size(cfg.validation_resolution, "validation_resolution")
    prompts = cfg.validation_prompt
    refs = cfg.validation_reference
    if not prompts:  # the first sample, the first with references on an edit model
        first = next((s for s in samples if s.references or flavour != "edit"), samples[0])
        prompts = [first.captions[0]]
        refs = [[str(r) for r in first.references]] if first.references else []
    if flavour == "edit" and not refs:
        raise ValueError(
            "validation_prompt is set but validation_reference is not: an edit needs an image"
        )
    if flavour != "edit" and any(config.as_list(r) for r in refs):
        raise ValueError(
            f"validation_reference is set, but the checkpoint is text-to-image ({flavour}): "
            "remove it, or train LongCat-Image-Edit"
        )
    val = []
    for i, prompt in enumerate(prompts):
        names = config.as_list(refs[i]) if refs else []
        loaded = [images.load_rgb(cfg_dir / r, key="validation_reference") for r in names]
        size = (width, height)
        if loaded:
            size = pipeline.edit_size(*loaded[0].size, area=width * height)
        for name, r in list(zip(names, loaded, strict=True))[1:]:
            if (d := pipeline.stretch(r.size, size)) > pipeline.STRETCH:
                print(
                    f"warning: validation_reference {name} ({r.width}x{r.height}) is stretched "
                    f"by {d:.0%} to {size[0]}x{size[1]}, the first reference's shape"
                )
        ref_images = [r.resize(size, Image.LANCZOS) for r in loaded]
        val.append({"prompt": prompt, "ref_images": ref_images, "size": size})
    return val


def prepare_data(cfg, ckpt, datasets, samples, notes, val, rank, device) -> pipeline.Models:
    """The caches (rank 0 writes, the others check) and the validation inputs, with each encoder
    loaded at most once: the VAE for every latent first, then the text encoder for every text, which
    is then freed; the VAE stays, on the CPU, for validation decoding."""
    options = pipeline.LoadOptions(text_encoder_quant=cfg.text_encoder_precision)
    models = pipeline.Models(ckpt, device, config.model_dtype(device), options)
    te_precision = quant.normalize_mode(cfg.text_encoder_precision)
    dtype = str(models.dtype).removeprefix("torch.")

    def latent(x: torch.Tensor) -> torch.Tensor:
        return M.to_latent(models.vae(), x.to(device)).cpu()

    def text(prompt: str, ref, where: str = "") -> torch.Tensor:
        return models.text_encoder().encode(prompt, ref, where).cpu()

    ident = model_identity(ckpt)
    w, h = max((s.bucket for s in samples), key=lambda b: b[0] * b[1])
    what = f"caching latents and prompts (buckets up to {w}x{h})"
    with pipeline.explain_oom(what, config.TRAIN_KNOBS, device):
        for v in val:
            v["ref_latents"] = [latent(images.pil_to_tensor(r)) for r in v["ref_images"]]
        if rank == 0:
            report = build_caches(
                datasets, latent, text, ident, dtype, te_precision, samples=samples, notes=notes
            )
            print(report.summary())
        if dist.is_initialized():
            dist.barrier()
        if rank != 0:  # the entries rank 0 wrote (a check only)
            build_caches(
                datasets, None, None, ident, dtype, te_precision, progress=False, samples=samples
            )
        for v in val:  # the negative prompt sees the same references
            refs = v["ref_images"][0] if len(v["ref_images"]) == 1 else v["ref_images"] or None
            v["txt"] = text(v["prompt"], refs, "validation_prompt")
            v["neg"] = None
            if cfg.validation_guidance > 1:
                v["neg"] = text(cfg.validation_negative_prompt, refs)
    models.drop("text_encoder")
    models.park()
    return models


def main(argv: list[str]) -> None:
    """`python data.py config.toml [--key=value ...]`: train.py's config, checkpoint and encoders,
    stopping once the data is checked and cached, with a report."""
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python data.py config.toml [--key=value ...]")
    path = Path(argv[0])
    try:
        cfg = config.load_config(path, argv[1:])
        device = config.pick_device(cfg.device, "device =")
        ckpt, datasets, samples, notes, _ = read_data(cfg, path.resolve().parent, device)
        world = int(os.environ.get("WORLD_SIZE", 1))  # as train.py will batch (torchrun sets it)
        B, A = cfg.train_batch_size, cfg.gradient_accumulation_steps
        notes += check_batches(samples, B, A, world)[0]  # a bucket too small; none fills: error
        prepare_data(cfg, ckpt, datasets, samples, notes, [], 0, device)
    except (ValueError, OSError) as e:
        pipeline.close_progress_bars()
        sys.exit("\n".join(f"error: {line}" for line in str(e).splitlines()))
    except KeyboardInterrupt:  # 130, as a shell reports Ctrl-C
        pipeline.close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])


# --------------------------------------------------------------------------------------------------
# What a run trained on, to notice a changed dataset on resume


def data_manifest(
    datasets: list[DatasetConfig], samples: list[Sample]
) -> dict[str, dict[str, str]]:
    """{dataset id: {pair name: digest}}: each sample by its target's path inside the dataset's
    folder, its digest over the content of its images (target, references, mask) and its captions.
    Two scans of unchanged data give the same."""
    folders = {ds.id: ds.instance_data_dir for ds in datasets}
    manifest: dict[str, dict[str, str]] = {}
    for s in samples:
        name = s.target.relative_to(folders[s.dataset]).with_suffix("").as_posix()
        content = json.dumps([s.target_hash, s.reference_hashes, s.mask_hash, s.captions])
        manifest.setdefault(s.dataset, {})[name] = hashlib.sha256(content.encode()).hexdigest()
    return manifest


def describe_changes(before: dict, now: dict) -> list[str]:
    """One line per dataset whose pairs differ: how many were added, removed and changed, with the
    first few names."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    lines = []
    for ds in sorted(set(before) | set(now)):
        old = before.get(ds, {})
        new = now.get(ds, {})
        parts = []
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
        for what, names in (("added", added), ("removed", removed), ("changed", changed)):
            if names:
                parts.append(f"{len(names)} pair(s) {what} ({some(names)})")
        if parts:
            lines.append(f"dataset '{ds}': " + "; ".join(parts))
    return lines
