"""data.py as a specification: pairing and config errors name every offender, odd images become
sensible RGB, pairs share their target's bucket, caches are reused exactly when nothing they depend
on changed, and the loader is deterministic, resumable and splits cleanly across ranks. Small
generated images, fake encoders."""

import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ROOT, assert_one_line_error, run_script  # noqa: E402

import data  # noqa: E402
import images  # noqa: E402
import tiny  # noqa: E402

RES, ALIGN = 64, 16  # buckets (48, 96), (48, 80), (64, 64), (80, 48), (96, 48): tiny, but both ways


def save_image(path: Path, size=(64, 64), seed=0, **kw) -> Path:
    rgb = np.random.default_rng(seed).integers(
        0, 256, (size[1], size[0], 3), dtype=np.uint8
    )  # (H, W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **kw)
    return path


class Encoders:
    """Deterministic stand-ins that count their calls. Latent: the image average-pooled 8x, channels
    repeated to 16. Text: random from a hash of (prompt, reference pixels), longer for a bigger
    reference (as Qwen)."""

    def __init__(self):
        self.latent_calls, self.text_calls = 0, 0

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        self.latent_calls += 1
        assert x.dtype == torch.float32 and x.shape[:2] == (1, 3) and -1 <= x.min() and x.max() <= 1
        return F.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]  # (1, 16, H/8, W/8)

    def text(self, prompt: str, ref, where: str = "") -> torch.Tensor:
        """ref: None, one image or a list of them (several references)."""
        self.text_calls += 1
        refs = [] if ref is None else ref if isinstance(ref, list) else [ref]
        key = prompt.encode() + b"".join(r.tobytes() + bytes(str(r.size), "ascii") for r in refs)
        g = torch.Generator().manual_seed(int(hashlib.sha256(key).hexdigest()[:8], 16))
        length = 4 + sum(r.width * r.height // 512 for r in refs)
        return torch.randn(1, length, 8, generator=g)


def edit_config(tmp: Path, targets: dict, refs: dict | None = None, **extra) -> list[dict]:
    """An edit set `edit/` paired with `ref/`: targets and refs map file names to sizes."""
    for i, (name, size) in enumerate(targets.items()):
        save_image(tmp / "edit" / name, size, seed=i)
        (tmp / "edit" / name).with_suffix(".txt").write_text(
            f"make {Path(name).stem} blue\nrecolour it"
        )
    for i, (name, size) in enumerate((refs if refs is not None else targets).items()):
        save_image(tmp / "ref" / name, size, seed=100 + i)
    edits = {
        "id": "edits",
        "type": "local",
        "instance_data_dir": str(tmp / "edit"),
        "resolution": RES,
        "caption_strategy": "textfile",
        "cache_dir_vae": str(tmp / "cache/vae/edit"),
        "conditioning_data": ["refs"],
        **extra,
    }
    refs = {
        "id": "refs",
        "type": "local",
        "instance_data_dir": str(tmp / "ref"),
        "resolution": RES,
        "cache_dir_vae": str(tmp / "cache/vae/ref"),
    }
    return [edits, refs]


def parse(cfg: list[dict], tmp: Path) -> list[data.DatasetConfig]:
    return data.parse_datasets(cfg, tmp, ALIGN)


def build(cfg, tmp, enc=None, model_id="model-a"):
    enc = enc or Encoders()
    return data.build_caches(
        parse(cfg, tmp), enc.latents, enc.text, model_id, "float32", progress=False
    ), enc


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def errors(excinfo) -> str:
    return "\n".join(excinfo.value.problems)


MIXED = {"wide.png": (120, 60), "tall.jpg": (50, 100), "square.webp": (70, 70)}


# --------------------------------------------------------------------------------------------------
# Buckets and images


def test_buckets_are_aligned_area_matched_and_within_aspect_limits():
    for res, align in [(RES, ALIGN), (768, 64), (1024, 64)]:
        buckets = data.make_buckets(res, align)
        assert (res, res) in buckets
        for w, h in buckets:
            assert w % align == 0 and h % align == 0 and 0.5 <= w / h <= 2, (w, h)
            assert abs(w * h - res * res) <= align * max(w, h), (
                w,
                h,
            )  # one grid step of error at most
            assert (h, w) in buckets  # portrait and landscape alike
    buckets = data.make_buckets(1024, 64)
    assert (
        data.nearest_bucket((3000, 2000), buckets)[0]
        > data.nearest_bucket((3000, 2000), buckets)[1]
    )
    assert (
        data.nearest_bucket((2000, 3000), buckets)[0]
        < data.nearest_bucket((2000, 3000), buckets)[1]
    )
    assert data.nearest_bucket((5000, 100), buckets) == max(buckets, key=lambda b: b[0] / b[1])


def test_pairs_take_the_target_bucket_and_references_fit_it_without_swapping(tmp_path):
    refs = {
        "wide.png": (40, 90),
        "tall.jpg": (100, 50),
        "square.webp": (30, 60),
    }  # other shapes on purpose
    report, _ = build(edit_config(tmp_path, MIXED, refs), tmp_path)
    buckets = {s.target.name: s.bucket for s in report.samples}
    assert (
        buckets["wide.png"][0] > buckets["wide.png"][1]
        and buckets["tall.jpg"][0] < buckets["tall.jpg"][1]
    )
    assert buckets["square.webp"] == (RES, RES)
    for s in report.samples:
        w, h = s.bucket
        for key, path in (
            ("target", s.entries["target"]),
            ("reference", s.entries["references"][0]),
        ):
            z = data.load_file(path)["latent"]
            assert z.shape == (16, h // 8, w // 8) and z.dtype == torch.float32, (
                key,
                z.shape,
                s.bucket,
            )


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        (
            "RGBA",
            (10, 20, 30, 0),
            (255, 255, 255),
        ),  # fully transparent -> white, not the hidden colour
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("LA", (0, 0), (255, 255, 255)),
        ("L", 128, (128, 128, 128)),
        (
            "I;16",
            65535,
            (255, 255, 255),
        ),  # 16-bit white stays white (a plain convert would clip wrongly)
        ("I;16", 32896, (128, 128, 128)),
        ("P", 3, None),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_any_mode_becomes_sensible_rgb(tmp_path, mode, value, expected):
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 8), value, np.uint16))
    else:
        img = Image.new(mode, (8, 8), value)
    if mode == "P":
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
        expected = (0, 0, 255)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    rgb = images.load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    assert np.abs(np.asarray(rgb, dtype=int) - np.array(expected)).max() <= 2, np.asarray(rgb)[0, 0]


def test_exif_rotation_is_applied_before_bucketing(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90° -> portrait
    save_image(tmp_path / "edit/rot.jpg", (96, 48), exif=exif.tobytes())
    save_image(tmp_path / "edit/plain.jpg", (96, 48))
    cfg = edit_config(tmp_path, {}, {"rot.png": (64, 64), "plain.png": (64, 64)})
    for name in ("rot", "plain"):
        (tmp_path / f"edit/{name}.txt").write_text("x")
    samples = {s.target.name: s for s in data.scan(parse(cfg, tmp_path))}
    assert samples["rot.jpg"].size == (48, 96) and samples["rot.jpg"].bucket == (48, 96)
    assert samples["plain.jpg"].size == (96, 48) and samples["plain.jpg"].bucket == (96, 48)
    assert images.load_rgb(tmp_path / "edit/rot.jpg").size == (48, 96)


def test_truncated_and_unreadable_images_are_all_named(tmp_path):
    cfg = edit_config(
        tmp_path, {"a.jpg": (64, 64), "b.png": (64, 64), "c.png": (64, 64), "ok.png": (64, 64)}
    )
    for name in ("a.jpg", "b.png"):
        blob = (tmp_path / "edit" / name).read_bytes()
        (tmp_path / "edit" / name).write_bytes(blob[: len(blob) // 2])
    (tmp_path / "ref/c.png").write_bytes(b"not an image at all")
    enc = Encoders()
    with pytest.raises(data.DataError) as e:
        data.build_caches(
            parse(cfg, tmp_path), enc.latents, enc.text, "m", "float32", progress=False
        )
    msg = errors(e)
    assert "a.jpg" in msg and "b.png" in msg and "ref/c.png" in msg and "ok.png" not in msg, msg
    assert enc.latent_calls == enc.text_calls == 0


def test_truncated_files_fail_even_if_another_library_allowed_them(tmp_path, monkeypatch):
    monkeypatch.setattr(images.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    save_image(tmp_path / "full.jpg", (64, 64))
    (tmp_path / "t.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:-300])
    with pytest.raises(images.ImageError, match="t.jpg: cannot read image"):
        images.load_rgb(tmp_path / "t.jpg")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size and holds no pixels: opening it reads the header only."""

    def chunk(body):
        return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(ihdr) + chunk(b"IDAT") + chunk(b"IEND")


@pytest.mark.parametrize(
    "size", [(9000, 9000), (30000, 30000)]
)  # ours, then Pillow's bomb limit too
def test_oversized_images_are_refused_before_decoding(tmp_path, size):
    (tmp_path / "big.png").write_bytes(png_header(*size))
    with pytest.raises(images.ImageError, match="big.png: cannot read image"):
        images.load_rgb(tmp_path / "big.png")


# --------------------------------------------------------------------------------------------------
# Config and pairing errors


def test_targets_without_a_reference_train_as_text_to_image_and_are_listed_in_one_note(tmp_path):
    """An edit set's target with no reference of its name trains with zero references (ai-toolkit
    #480), named in one note. Catches: an orphan dropped, or given another file's reference."""
    cfg = edit_config(
        tmp_path,
        {"a.png": (64, 64), "b.png": (64, 64), "c.png": (64, 64), "d.png": (64, 64)},
        {"b.jpg": (64, 64)},
    )
    notes = []
    samples = data.scan(parse(cfg, tmp_path), notes)
    refs = {s.target.name: [r.name for r in s.references] for s in samples}
    assert refs == {"a.png": [], "b.png": ["b.jpg"], "c.png": [], "d.png": []}, refs
    (line,) = [n for n in notes if "no reference" in n]
    assert all(n in line for n in ("a.png", "c.png", "d.png")) and "b.png" not in line, line
    assert line.endswith("trained as text-to-image"), line


def test_an_edit_set_with_no_reference_at_all_is_an_error_naming_every_target(tmp_path):
    """Every target unpaired is a wrong folder, not a text-to-image mix. Catches: the run going on
    as text-to-image."""
    cfg = edit_config(tmp_path, {"a.png": (64, 64), "c.png": (64, 64)}, {"b.jpg": (64, 64)})
    with pytest.raises(data.DataError) as e:
        data.scan(parse(cfg, tmp_path))
    (line,) = e.value.problems
    assert "a.png" in line and "c.png" in line and "no reference of the same name" in line, line


def test_all_missing_captions_are_listed_each_with_why(tmp_path):
    """Missing, blank, UTF-16 without a BOM (valid UTF-8 full of NULs), latin-1: each named with
    its own reason. Catches a NUL-riddled caption trained as text, or one reason for all."""
    names = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    cfg = edit_config(tmp_path, {n: (64, 64) for n in names})
    (tmp_path / "edit/a.txt").unlink()
    (tmp_path / "edit/c.txt").write_text("  \n")
    (tmp_path / "edit/d.txt").write_bytes("make it blue".encode("utf-16-le"))
    (tmp_path / "edit/e.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(data.DataError) as e:
        data.scan(parse(cfg, tmp_path))
    (line,) = e.value.problems
    assert line == (
        "dataset 'edits': 4 without a caption: a.png (no a.txt), c.png (c.txt is empty), d.png "
        "(d.txt holds NUL or control characters (UTF-16 without a BOM?)), e.png (e.txt is not "
        "UTF-8)"
    ), line


def test_captions_are_lines_split_at_newlines_only(tmp_path):
    """SimpleTuner splits a caption file at "\\n"; U+2028 (a paste from a web page) is no line
    break there. Catches str.splitlines, which makes two captions of one."""
    cfg = edit_config(tmp_path, {"a.png": (64, 64)})
    (tmp_path / "edit/a.txt").write_text("make it\u2028blue\r\nrecolour it\n", newline="")
    (sample,) = data.scan(parse(cfg, tmp_path))
    assert sample.captions == ["make it\u2028blue", "recolour it"], sample.captions


def test_keys_with_no_effect_are_named_and_a_disabled_reference_too(tmp_path):
    """A reference set's own repeats and size, an instance_prompt beside textfile captions, mask
    settings without mask: one note each. A disabled set named in conditioning_data is named as
    disabled. Catches keys silently ignored, and "no dataset 'refs'" for one that is there."""
    cfg = edit_config(tmp_path, {"a.png": (64, 64)}, instance_prompt="x", mask_floor=0.5)
    cfg[1].update(repeats=3, resolution=512)
    notes = []
    data.parse_datasets(cfg, tmp_path, 64, notes)
    assert notes == [
        "dataset 'edits': instance_prompt is not used: caption_strategy is 'textfile' (set it to "
        "'instanceprompt' to use it)",
        "dataset 'edits': mask_floor not used: they tune mask = 'difference'",
        "dataset 'refs': repeats is not used: a reference follows its target's",
        f"dataset 'refs': resolution 512 is not used: a reference is fitted into its target's "
        f"bucket (resolution {RES})",
    ], notes
    cfg[1]["disabled"] = True
    with pytest.raises(data.DataError, match="names dataset 'refs', which is disabled"):
        parse(cfg, tmp_path)


def test_unknown_key_names_it_and_the_closest_valid_one(tmp_path):
    cfg = edit_config(tmp_path, {"a.png": (64, 64)})
    cfg[0]["instance_data_dirr"] = "x"
    cfg[1]["cache_dir"] = "y"
    with pytest.raises(data.DataError) as e:
        parse(cfg, tmp_path)
    assert "unknown key 'instance_data_dirr' (did you mean 'instance_data_dir'?)" in errors(e)
    assert "unknown key 'cache_dir' (did you mean 'cache_dir_vae'?)" in errors(e)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"conditioning_data": ["ref"]},
            "conditioning_data: no dataset 'ref' (did you mean 'refs'?)",
        ),
        ({"resolution": "768"}, "resolution should be int, got '768'"),
        ({"repeats": True}, "repeats should be int"),
        ({"type": "aws"}, "type = 'aws' is not supported"),
        ({"caption_strategy": None}, "needs a caption_strategy"),  # JSON null = unset
    ],
)
def test_bad_values_are_named(tmp_path, change, message):
    cfg = edit_config(tmp_path, {"a.png": (64, 64)})
    cfg[0].update(change)
    with pytest.raises(data.DataError) as e:
        parse(cfg, tmp_path)
    assert len(e.value.problems) == 1 and "dataset 'edits'" in errors(e), errors(e)
    assert message in errors(e), errors(e)


def test_missing_and_empty_folders_are_named(tmp_path):
    cfg = edit_config(tmp_path, {"a.png": (64, 64)})
    for p in (tmp_path / "ref").iterdir():
        p.unlink()
    cfg[0]["instance_data_dir"] = str(tmp_path / "nope")
    with pytest.raises(data.DataError) as e:
        data.scan(parse(cfg, tmp_path))
    assert "nope is not a folder" in errors(e) and f"in {tmp_path / 'ref'}" in errors(e), errors(e)


def test_cache_inside_an_image_folder_is_refused(tmp_path):
    cfg = edit_config(tmp_path, {"a.png": (64, 64)})
    cfg[0]["cache_dir_vae"] = str(tmp_path / "ref/cache")
    with pytest.raises(data.DataError, match="inside the images of 'refs'"):
        parse(cfg, tmp_path)


# --------------------------------------------------------------------------------------------------
# Caches


def test_second_run_reuses_everything_and_writes_nothing(tmp_path):
    cfg = edit_config(tmp_path, MIXED)
    first, enc = build(cfg, tmp_path)
    assert (
        first.hits == 0 and enc.latent_calls == 6 and enc.text_calls == 9
    )  # 3 x (2 captions + empty)
    before = mtimes(tmp_path / "cache")
    second, enc = build(cfg, tmp_path)
    assert second.hits == first.misses == 15 and second.misses == 0
    assert enc.latent_calls == enc.text_calls == 0
    assert mtimes(tmp_path / "cache") == before


def test_changed_image_or_caption_refreshes_only_its_entries(tmp_path):
    cfg = edit_config(tmp_path, MIXED)
    build(cfg, tmp_path)
    changes = [
        (
            lambda: save_image(tmp_path / "edit/tall.jpg", (50, 100), seed=999),
            (1, 0),
        ),  # target: its latent
        (
            lambda: save_image(tmp_path / "ref/wide.png", (120, 60), seed=999),
            (1, 3),
        ),  # ref: latent + 3 texts
        (
            lambda: (tmp_path / "edit/square.txt").write_text("make it red\nrecolour it"),
            (0, 1),
        ),  # one text
    ]
    for change, (latents, texts) in changes:
        before = mtimes(tmp_path / "cache")
        change()
        report, enc = build(cfg, tmp_path)
        assert (enc.latent_calls, enc.text_calls, report.misses) == (
            latents,
            texts,
            latents + texts,
        )
        after = mtimes(tmp_path / "cache")
        assert len(set(after) - set(before)) == latents + texts and all(
            after[p] == t for p, t in before.items()
        )


def test_changed_bucket_or_model_is_a_miss(tmp_path):
    cfg = edit_config(tmp_path, MIXED)
    build(cfg, tmp_path)
    report, enc = build(cfg, tmp_path, model_id="model-b")
    assert report.hits == 0 and enc.latent_calls == 6
    cfg[0]["resolution"] = 96
    report, enc = build(cfg, tmp_path)
    assert report.hits == 0 and enc.latent_calls == 6 and enc.text_calls == 9
    assert all(s.bucket in data.make_buckets(96, ALIGN) for s in report.samples)


def test_t2i_text_is_keyed_by_instruction_only(tmp_path):
    save_image(tmp_path / "imgs/a.png", (64, 64))
    save_image(tmp_path / "imgs/b.png", (120, 60), seed=1)
    cfg = [
        {
            "id": "t2i",
            "instance_data_dir": "imgs",
            "caption_strategy": "instanceprompt",
            "instance_prompt": "a photo of sks",
            "resolution": RES,
            "cache_dir_vae": "cache",
        }
    ]
    report, enc = build(cfg, tmp_path)
    assert (
        enc.text_calls == 2 and enc.latent_calls == 2
    )  # "a photo of sks" and "", shared by both images
    assert report.samples[0].entries["texts"] == report.samples[1].entries["texts"]
    batch = next(iter(data.Loader(report.samples, seed=0)))
    assert batch["reference"] is None and batch["text"].shape == (1, 4, 8)


def test_interrupted_write_is_remade_and_tmp_files_ignored(tmp_path):
    cfg = edit_config(tmp_path, MIXED)
    report, _ = build(cfg, tmp_path)
    victim = report.samples[0].entries["target"]
    victim.write_bytes(
        victim.read_bytes()[:50]
    )  # what a crash mid-write without os.replace could leave
    stray = victim.with_name(victim.name + ".tmp-999")
    stray.write_bytes(b"half")
    report, enc = build(cfg, tmp_path)
    assert report.misses == 1 and enc.latent_calls == 1 and enc.text_calls == 0
    assert data.load_file(victim)["latent"].shape[0] == 16 and stray.read_bytes() == b"half"


def test_dataset_folders_are_never_written(tmp_path):
    cfg = edit_config(tmp_path, MIXED)

    def fingerprint():
        files = sorted(p for d in ("edit", "ref") for p in (tmp_path / d).rglob("*"))
        return [
            (str(p), p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in files
        ]

    before = fingerprint()
    build(cfg, tmp_path)
    build(cfg, tmp_path)
    assert fingerprint() == before


def test_entries_carry_their_source_and_bucket(tmp_path):
    report, _ = build(edit_config(tmp_path, {"wide.png": (120, 60)}), tmp_path)
    s = report.samples[0]
    with safe_open(s.entries["references"][0], "pt") as f:
        meta = f.metadata()
    assert meta["source"].endswith("ref/wide.png") and meta["bucket"] == "96x48"


def test_check_only_mode_refuses_missing_entries(tmp_path):
    cfg = edit_config(tmp_path, MIXED)
    with pytest.raises(data.DataError, match="python data.py"):
        data.build_caches(parse(cfg, tmp_path), None, None, "m", "float32", progress=False)
    build(cfg, tmp_path, model_id="m")
    assert (
        data.build_caches(parse(cfg, tmp_path), None, None, "m", "float32", progress=False).misses
        == 0
    )


# --------------------------------------------------------------------------------------------------
# Loader


def loader_samples(tmp_path, n=10, **extra):
    sizes = [(120, 60), (50, 100), (70, 70)]
    names = {f"{i:02d}.png": sizes[i % 3] for i in range(n)}
    report, _ = build(edit_config(tmp_path, names, **extra), tmp_path)
    return report.samples


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_is_deterministic_and_batches_share_a_bucket(tmp_path):
    samples = loader_samples(tmp_path, n=12)
    a, b = data.Loader(samples, batch_size=2, seed=1), data.Loader(samples, batch_size=2, seed=1)
    assert len(a) == 6  # 4 per bucket: 2 full batches each
    first = take(a, 12)  # two epochs
    assert [x["files"] for x in first] == [x["files"] for x in take(b, 12)]
    other = take(data.Loader(samples, batch_size=2, seed=2), 12)
    assert [x["files"] for x in first] != [x["files"] for x in other]
    for batch in first:
        w, h = batch["bucket"]
        assert batch["target"].shape == batch["reference"].shape == (2, 16, h // 8, w // 8)
        assert batch["text"].shape == batch["text_empty"].shape and batch["text"].shape[0] == 2
    assert sorted(f for x in first[:6] for f in x["files"]) == sorted(
        str(s.target) for s in samples
    )


def test_loader_drops_incomplete_batches_and_honours_repeats(tmp_path):
    samples = loader_samples(
        tmp_path, n=5, repeats=2
    )  # buckets of 2, 2, 1 samples, each 3 times per epoch
    assert len(data.Loader(samples, batch_size=1)) == 15
    assert len(data.Loader(samples, batch_size=4)) == 2  # 6, 6, 3 items -> 1 + 1 + 0 batches
    epoch = [f for x in take(data.Loader(samples, batch_size=1, seed=0), 15) for f in x["files"]]
    assert all(epoch.count(str(s.target)) == 3 for s in samples)
    with pytest.raises(data.DataError, match="no bucket fills a batch"):
        data.Loader(samples[:1], batch_size=4)


def test_images_in_a_bucket_that_fills_no_batch_are_named(tmp_path):
    """Buckets of 2, 2 and 1 images, each repeated to 3 per epoch: a global batch of 4 (2 per GPU
    x 2 accumulation steps x 1 GPU) fills from the first two, never from the third, whose image
    is named. A second reference on one image splits its bucket by the count of references.
    None filling stops with the keys to change. Catches: gradient accumulation or GPUs left out
    of the batch, the reference count ignored (a batch mixing 1 and 2 references)."""
    samples = loader_samples(tmp_path, n=5, repeats=2)  # 00, 03 wide; 01, 04 tall; 02 square
    warnings, untrained = data.check_batches(samples, 2, 2, 1)
    assert untrained == [str(samples[2].target)], untrained
    (line,) = warnings
    assert "holds 3" in line and "gradient_accumulation_steps 2 x 1 GPU(s) = 4" in line, line
    assert data.check_batches(samples, 3, 1, 1)[1] == []  # 3 of a kind fill a batch of 3
    assert len(data.check_batches(samples, 1, 2, 2)[1]) == 1  # 2 x 2 GPUs: also 4
    samples[3].references = [*samples[3].references, samples[3].references[0]]
    _, untrained = data.check_batches(samples, 1, 4, 1)  # 6 - 3 wide with one reference
    assert sorted(untrained) == sorted(str(samples[i].target) for i in (0, 2, 3)), untrained
    with pytest.raises(data.DataError, match="gradient_accumulation_steps 4 x 2 GPU"):
        data.check_batches(samples, 1, 4, 2)


def test_loader_resumes_mid_epoch_exactly(tmp_path):
    samples = loader_samples(tmp_path, n=9)
    straight = take(
        data.Loader(samples, batch_size=1, seed=3), 20
    )  # 9 per epoch: crosses two epochs
    first = data.Loader(samples, batch_size=1, seed=3)
    it = iter(first)
    [next(it) for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = data.Loader(samples, batch_size=1, seed=3)
    resumed.load_state_dict(state)
    rest = take(resumed, 13)
    assert [x["files"] for x in rest] == [x["files"] for x in straight[7:]]
    assert all(torch.equal(x["text"], y["text"]) for x, y in zip(rest, straight[7:], strict=True))


def test_ranks_get_disjoint_slices_of_the_same_bucket(tmp_path):
    samples = loader_samples(tmp_path, n=12)
    r0, r1 = (data.Loader(samples, batch_size=2, seed=5, rank=r, world_size=2) for r in (0, 1))
    assert len(r0) == len(r1) == 3  # 4 per bucket: one global batch of 4 each
    seen = []
    for a, b in zip(take(r0, 3), take(r1, 3), strict=True):
        assert a["bucket"] == b["bucket"] and not set(a["files"]) & set(b["files"])
        seen += a["files"] + b["files"]
    assert sorted(seen) == sorted(str(s.target) for s in samples)


# --------------------------------------------------------------------------------------------------
# CLI


def write_toml(tmp_path: Path, cfg: list[dict], extra: str = "") -> Path:
    lines = [extra]
    for d in cfg:
        lines.append("[[datasets]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in d.items()]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("problem", ["orphan", "truncated", "unknown key", "bad toml"])
def test_cli_reports_problems_in_one_line_each(tmp_path, capsys, problem):
    cfg = edit_config(tmp_path, {"a.png": (64, 64), "b.png": (64, 64)})
    if problem == "orphan":  # every target without its reference
        (tmp_path / "ref/a.png").unlink()
        (tmp_path / "ref/b.png").unlink()
        save_image(tmp_path / "ref/c.png", (64, 64))
    if problem == "truncated":
        blob = (tmp_path / "ref/a.png").read_bytes()
        (tmp_path / "ref/a.png").write_bytes(blob[:-200])
    if problem == "unknown key":
        cfg[0]["captionstrategy"] = "textfile"
    config = write_toml(tmp_path, cfg, 'pretrained_model_name_or_path = "/nonexistent/checkpoint"')
    if problem == "bad toml":
        config.write_text(config.read_text() + "resolution = = 3\n")
    with pytest.raises(SystemExit) as stop:  # `python data.py config.toml`
        data.main([str(config)])
    lines = str(stop.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    expected = {
        "orphan": "b.png",
        "truncated": "a.png",
        "unknown key": "caption_strategy",
        "bad toml": f"{config}: ",  # the file, then the parser's "(at line N, column M)"
    }
    assert expected[problem] in lines[0], lines[0]
    if problem == "bad toml":
        assert "(at line" in lines[0], lines[0]
    assert not (tmp_path / "cache").exists()  # checked before any model or cache work


def test_cli_process_exits_non_zero_without_a_traceback(tmp_path):
    cfg = edit_config(tmp_path, {"a.png": (64, 64), "b.png": (64, 64)}, {"c.png": (64, 64)})
    proc = run_script(ROOT / "data.py", write_toml(tmp_path, cfg), check=False)
    assert_one_line_error(proc, "b.png")


def test_cli_builds_with_a_tiny_checkpoint_then_reuses_everything(tmp_path, capsys):
    tiny.write(tmp_path / "ckpt", "edit")
    cfg = edit_config(tmp_path, {"a.png": (128, 64), "b.png": (64, 128)}, resolution=96)
    cfg[1]["resolution"] = 96
    config = write_toml(
        tmp_path, cfg, 'pretrained_model_name_or_path = "ckpt"\naspect_bucket_alignment = 32'
    )
    for expected in (
        "0 reused, 10 written",
        "10 reused, 0 written",
    ):  # 2 x (2 latents, 2 captions, "")
        capsys.readouterr()
        data.main([str(config)])
        out = capsys.readouterr()
        assert expected in out.out, out.err[-2000:]
    model_id = data.model_identity(tmp_path / "ckpt")
    report = data.build_caches(
        parse(cfg, tmp_path), None, None, model_id, "float32", progress=False
    )
    batch = next(iter(data.Loader(report.samples, seed=0)))
    w, h = batch["bucket"]
    assert batch["target"].shape == batch["reference"].shape == (1, 16, h // 8, w // 8)
    assert batch["text"].shape == batch["text_empty"].shape and batch["text"].shape[1] > 512


def test_data_py_runs_on_the_tiny_example_config(tmp_path):
    """`python data.py examples/tiny.toml`: the `tiny` checkpoint is known to it (a random one,
    cached)."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = run_script(ROOT / "data.py", ROOT / "examples/tiny.toml", env=env)
    assert "6 samples; cache entries:" in proc.stdout and (tmp_path / "xdg/minicat").is_dir(), (
        proc.stdout
    )
    # the batch train.py will draw: buckets of 2 fill no batch of 4, as train.py would stop
    proc = run_script(
        ROOT / "data.py", ROOT / "examples/tiny.toml", "--train_batch_size=4", env=env, check=False
    )
    assert proc.returncode == 1 and "error: no bucket fills a batch of train_batch_size 4" in (
        proc.stderr
    ), proc.stderr


# --------------------------------------------------------------------------------------------------
# Nothing skipped silently, nothing used unchecked


def test_files_that_are_skipped_are_reported(tmp_path):
    cfg = edit_config(
        tmp_path, {"a.png": (64, 64)}, refs={"a.png": (64, 64), "lonely.png": (64, 64)}
    )
    Image.new("RGB", (64, 64)).save(tmp_path / "edit/anim.gif")
    Image.new("RGB", (64, 64)).save(tmp_path / "ref/anim.gif")
    (tmp_path / "edit/anim.txt").write_text("make it move")
    Image.new("RGB", (64, 64)).save(tmp_path / "edit/.draft.png")  # hidden
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "edit/more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    report, _ = build(cfg, tmp_path)
    warnings = "\n".join(report.warnings)
    assert (
        "dataset 'edits': skipped 1 file(s) that are not" in warnings and "anim.gif" in warnings
    ), warnings
    assert "dataset 'refs': skipped 1 file(s)" in warnings
    assert "1 reference(s) without an edit image, skipped: lonely" in warnings, warnings
    # also what rglob passes over without a word: hidden images, linked folders, lone captions
    assert "skipped 1 hidden image(s) (a name or folder starting with '.'): .draft.png" in warnings
    assert "skipped 1 caption(s) beside no image of the same name: anim.txt" in warnings, warnings
    assert "skipped 1 linked folder(s), not followed" in warnings and ": more" in warnings
    assert len(report.samples) == 1


def test_a_caption_is_named_to_the_text_encoder_by_its_file_and_place(tmp_path):
    """The text encoder's 512-token warning names what the user edits: the .txt and which of its
    captions. Catches the image named instead (the warning then points at a picture)."""
    cfg = edit_config(tmp_path, {"a.png": (64, 64)})  # a.txt: "make a blue", "recolour it"
    seen = []
    enc = Encoders()
    text = enc.text
    enc.text = lambda prompt, ref, where="": seen.append(where) or text(prompt, ref, where)
    build(cfg, tmp_path, enc)
    txt = tmp_path / "edit/a.txt"
    assert sorted(seen) == ["", f"{txt} (caption 1)", f"{txt} (caption 2)"], seen
    # captions on the reference set replace the target's: their file is named
    (tmp_path / "ref/a.txt").write_text("from the reference")
    cfg[1]["caption_strategy"] = "textfile"
    seen.clear()
    build(cfg, tmp_path, enc)
    assert seen == [f"{tmp_path / 'ref/a.txt'} (caption 1)"], seen


def test_reference_captions_replace_the_instructions_with_a_warning(tmp_path):
    cfg = edit_config(tmp_path, {"a.png": (64, 64), "b.png": (64, 64)})
    cfg[1]["caption_strategy"] = (
        "textfile"  # SimpleTuner's configs may carry this on the reference set
    )
    (tmp_path / "ref/a.txt").write_text("the reference's caption")
    report, enc = build(cfg, tmp_path)
    captions = {s.target.name: s.captions for s in report.samples}
    assert captions == {
        "a.png": ["the reference's caption"],
        "b.png": ["make b blue", "recolour it"],
    }
    assert (
        sum(
            "dataset 'refs' has captions: they replace those of 'edits'" in w
            for w in report.warnings
        )
        == 1
    )


def test_a_nan_cache_entry_is_named_and_made_again(tmp_path):
    cfg = edit_config(tmp_path, {"a.png": (64, 64)})
    report, _ = build(cfg, tmp_path)
    entry = report.samples[0].entries["texts"][0]
    t = load_file(entry)["text"]
    data._write(entry, "text", torch.full_like(t, float("nan")), {})
    report, enc = build(cfg, tmp_path)
    assert enc.text_calls == 1 and report.misses == 1, (enc.text_calls, report.misses)
    assert any(
        f"cache entry {entry}: holds NaN or inf: made again" in w for w in report.warnings
    ), report.warnings
    assert torch.isfinite(load_file(entry)["text"]).all()


def test_the_loader_refuses_an_entry_damaged_during_the_run(tmp_path):
    samples = loader_samples(tmp_path, n=3)
    latent = samples[0].entries["target"]
    latent.write_bytes(latent.read_bytes()[:-100])
    with pytest.raises(data.DataError, match=f"cache entry {latent}: unreadable"):
        take(data.Loader(samples, batch_size=1, seed=0), 3)


def test_text_entries_depend_on_the_text_encoders_precision(tmp_path):
    cfg = edit_config(tmp_path, {"a.png": (64, 64)})
    enc = Encoders()
    sets = parse(cfg, tmp_path)
    full = data.build_caches(sets, enc.latents, enc.text, "m", "float32", "none", progress=False)
    int8 = data.build_caches(sets, enc.latents, enc.text, "m", "float32", "int8", progress=False)
    a, b = full.samples[0].entries, int8.samples[0].entries
    assert a["texts"] != b["texts"] and a["empty"] != b["empty"] and a["target"] == b["target"]
    assert int8.misses == 3 and int8.hits == 2  # the three texts re-encoded, the two latents reused


def test_every_latent_is_encoded_before_any_text(tmp_path):
    """So the VAE and the text encoder need never be on the GPU together."""
    order = []
    enc = Encoders()

    def latents(x):
        order.append("latent")
        return enc.latents(x)

    def text(prompt, ref, where=""):
        order.append("text")
        return enc.text(prompt, ref)

    data.build_caches(
        parse(edit_config(tmp_path, MIXED), tmp_path), latents, text, "m", "float32", progress=False
    )
    assert order == sorted(order) and order.count("latent") == 6 and order.count("text") == 9, order


def test_images_cut_beyond_a_fifth_or_scaled_unlike_their_target_are_named(tmp_path):
    """A 64x1024 target keeps a fraction of itself in the 1:2 bucket; a reference of another shape
    (1x1 upscaled, or a wide one for a tall target) is named too; same-shaped pairs are not."""
    targets = {"tall.png": (32, 512), "fine.png": (64, 64), "tiny_ref.png": (64, 64)}
    refs = {"tall.png": (32, 512), "fine.png": (64, 64), "tiny_ref.png": (1, 1)}
    notes = []
    data.scan(parse(edit_config(tmp_path, targets, refs), tmp_path), notes)
    text = "\n".join(notes)
    # 32x512 (1:16) covered into a 1:2 bucket keeps 2/16 = 12.5 % of itself
    assert f"{tmp_path / 'edit/tall.png'}: 32x512 is cropped to its" in text, text
    assert "keeping 12% of it" in text or "keeping 13% of it" in text, text
    assert f"{tmp_path / 'ref/tiny_ref.png'}: the reference is 1x1" in text, text
    assert "fine.png" not in text, text


def test_many_like_notes_are_capped_with_a_count():
    """180 cropped images gave 180 lines; the report keeps 20 and counts the rest. Catches the
    count off by the shown ones, or a cap that drops lines without a word."""
    lines = [f"{i}.png: cropped" for i in range(25)]
    assert data.capped(lines, "cropped") == [
        *lines[:20],
        "... and 5 more images cropped (the first 20 above)",
    ]
    assert data.capped(lines[:20], "cropped") == lines[:20]
