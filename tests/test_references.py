"""Zero to N references per sample (issue 21, item 2) as a specification: the position ids of the
k-th reference, pairing with several reference sets, the caches (one reference keeps the names it
always had), the loader, and a run with a two-reference and a zero-reference set that trains and
validates, and validate.py with --ref twice. Small generated images, fake encoders, the tiny model.

The choice (README, "Several references"): reference k (0-based, in conditioning_data's order) gets
position ids (2 + k, L + row, L + col): the target's grid, told apart by the first RoPE axis alone.
k = 0 is the official edit input exactly."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from conftest import ROOT, assert_one_line_error, train_cli, validate_cli
from PIL import Image
from test_data import RES, Encoders, build, edit_config, save_image
from test_train import losses, write_config

import config
import data
import model as M
import train

EXAMPLES = ROOT / "examples"


def two_reference_config(tmp: Path, targets: dict, first: dict, second: dict) -> list[dict]:
    """edit_config's sets plus a second reference set `ref2/`, named second in conditioning_data."""
    cfg = edit_config(tmp, targets, first)
    for i, (name, size) in enumerate(second.items()):
        save_image(tmp / "ref2" / name, size, seed=200 + i)
    cfg[0]["conditioning_data"] = ["refs", "refs2"]
    cfg.append(
        {
            "id": "refs2",
            "type": "local",
            "instance_data_dir": str(tmp / "ref2"),
            "resolution": RES,
            "cache_dir_vae": str(tmp / "cache/vae/ref2"),
        }
    )
    return cfg


# --------------------------------------------------------------------------------------------------
# Position ids


def test_reference_k_takes_modality_2_plus_k_on_the_target_grid():
    """Written out by hand: text (0, i, i); target (1, L + r, L + c); reference k (2 + k, L + r,
    L + c). Catches: every reference at modality 2; a reference's grid placed after the target's."""
    L, h, w = 3, 4, 6  # latent h x w -> a 2 x 3 token grid
    noisy = torch.randn(1, 16, h, w)
    refs = [torch.randn(1, 16, h, w), torch.randn(1, 16, h, w)]
    tokens, img_ids, txt_ids = M.image_sequence(noisy, refs, L)
    grid = [(L + r, L + c) for r in range(2) for c in range(3)]
    want = [(m, r, c) for m in (1, 2, 3) for r, c in grid]
    assert img_ids.tolist() == [list(map(float, t)) for t in want], img_ids
    assert txt_ids.tolist() == [[0.0, i, i] for i in range(L)], txt_ids
    n = len(grid)
    for k, ref in enumerate(refs):  # reference k's tokens sit in block k + 1, packed as the target
        assert torch.equal(tokens[:, (k + 1) * n : (k + 2) * n], M.pack(ref)), k


def test_the_first_reference_is_the_official_single_reference_input():
    """A second reference appends tokens and ids; the target's and the first reference's stay as
    with one. Catches: a second reference shifting or reordering the first."""
    noisy, a, b = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    one = M.image_sequence(noisy, [a], 5)
    two = M.image_sequence(noisy, [a, b], 5)
    n = one[0].shape[1]
    assert torch.equal(two[0][:, :n], one[0]) and torch.equal(two[1][:n], one[1])
    assert torch.equal(two[2], one[2])


def test_flow_loss_with_one_reference_in_a_list_is_bit_identical_and_a_second_is_seen(tiny_edit):
    """flow_loss(ref) == flow_loss([ref]) exactly; adding a second reference changes the loss.
    Catches: the list form dropping or doubling the reference; the second one ignored."""
    transformer = M.load_transformer(tiny_edit, torch.float32)
    g = torch.Generator().manual_seed(0)
    x0, ref, ref2, noise = (torch.randn(2, 16, 4, 6, generator=g) for _ in range(4))
    text = torch.randn(2, 7, transformer.context_embedder.in_features, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        single = train.flow_loss(transformer, x0, ref, text, sigma, noise)
        listed = train.flow_loss(transformer, x0, [ref], text, sigma, noise)
        both = train.flow_loss(transformer, x0, [ref, ref2], text, sigma, noise)
    assert torch.equal(single, listed), (single, listed)
    assert (both - single).abs() > 1e-6, (both, single)


# --------------------------------------------------------------------------------------------------
# Pairing, caches, loader


def test_a_target_keeps_the_references_found_under_its_name_in_conditioning_data_order(tmp_path):
    """a: both references; b: only the second; c: none (text-to-image). Each reference's latent is
    in its own set's cache at the target's bucket, and the text encoder sees every reference image,
    at the bucket size, in order. Catches: references reordered, a partial pair dropped, a reference
    cached at its own size, the encoder shown only the first."""
    targets = {"a.png": (96, 48), "b.png": (64, 64), "c.png": (64, 64)}
    cfg = two_reference_config(
        tmp_path, targets, {"a.png": (40, 40)}, {"a.png": (50, 90), "b.png": (30, 30)}
    )
    seen = []
    enc = Encoders()
    real = enc.text

    def text(prompt, ref, where=""):
        refs = [] if ref is None else ref if isinstance(ref, list) else [ref]
        seen.append((prompt, [r.size for r in refs]))
        return real(prompt, ref, where)

    enc.text = text
    report, _ = build(cfg, tmp_path, enc)
    by_name = {s.target.name: s for s in report.samples}
    got = {n: [str(r.relative_to(tmp_path)) for r in s.references] for n, s in by_name.items()}
    assert got == {"a.png": ["ref/a.png", "ref2/a.png"], "b.png": ["ref2/b.png"], "c.png": []}
    a = by_name["a.png"]
    assert a.bucket == (96, 48)
    assert [p.parent for p in a.entries["references"]] == [
        tmp_path / "cache/vae/ref",
        tmp_path / "cache/vae/ref2",
    ]
    for p in a.entries["references"]:
        assert data.load_file(p)["latent"].shape == (16, 48 // 8, 96 // 8), p
    assert ("make a blue", [(96, 48), (96, 48)]) in seen, seen
    assert ("make c blue", []) in seen, seen


def test_one_reference_keeps_the_cache_names_it_always_had(tmp_path):
    """The names, composed by hand as minicat-data-2 composed them: latents by (image sha256,
    bucket, model, dtype); texts by (caption, reference sha256, bucket, model, dtype, precision).
    Catches: a changed key for single-reference entries (every user's cache would miss)."""
    report, _ = build(edit_config(tmp_path, {"a.png": (64, 64)}), tmp_path)
    s = report.samples[0]

    def name(*parts) -> str:
        text = json.dumps(["minicat-data-2", *parts])
        return hashlib.sha256(text.encode()).hexdigest() + ".safetensors"

    ref_sha = hashlib.sha256((tmp_path / "ref/a.png").read_bytes()).hexdigest()
    target_sha = hashlib.sha256((tmp_path / "edit/a.png").read_bytes()).hexdigest()
    latent = ["64x64", "model-a", "float32"]
    text = [ref_sha, "64x64", "model-a", "float32", "none"]
    assert s.entries["target"].name == name("latent", target_sha, *latent)
    assert [p.name for p in s.entries["references"]] == [name("latent", ref_sha, *latent)]
    assert s.entries["texts"][0].name == name("text", "make a blue", *text)
    assert s.entries["empty"].name == name("text", "", *text)


def test_batches_hold_one_count_of_references(tmp_path):
    """Two targets with two references, two with none: a batch of 2 never mixes them; a two-
    reference batch carries a list of two [B, 16, h, w], a t2i batch None. Catches: grouping by
    edit-or-not only (a batch of 2 and 0 references would not stack)."""
    targets = {n: (64, 64) for n in ("a.png", "b.png", "c.png", "d.png")}
    both = {"a.png": (64, 64), "b.png": (64, 64)}
    report, _ = build(two_reference_config(tmp_path, targets, both, both), tmp_path)
    loader = data.Loader(report.samples, batch_size=2, seed=1)
    kinds = []
    for _, batch in zip(range(2 * len(loader)), loader, strict=False):
        ref = batch["reference"]
        names = sorted(Path(f).name for f in batch["files"])
        if ref is None:
            assert names == ["c.png", "d.png"], names
            kinds.append(0)
        else:
            assert names == ["a.png", "b.png"] and len(ref) == 2, names
            assert all(r.shape == (2, 16, 8, 8) for r in ref)
            kinds.append(2)
    assert sorted(set(kinds)) == [0, 2], kinds


# --------------------------------------------------------------------------------------------------
# A run, and validate.py


def test_a_two_reference_and_a_zero_reference_set_train_and_validate(tiny_edit, tmp_path):
    """The example pairs with a second reference set (the first mirrored) and a text-to-image set
    of the same targets, on the edit model; validation with two references and with none. Catches:
    a t2i set refused on the edit model, a list of references breaking the step or validation."""
    pairs = tmp_path / "pairs"
    shutil.copytree(EXAMPLES / "edit", pairs / "edit")
    shutil.copytree(EXAMPLES / "ref", pairs / "ref")
    (pairs / "ref2").mkdir()
    for p in sorted((EXAMPLES / "ref").glob("*.png")):
        Image.open(p).transpose(Image.FLIP_LEFT_RIGHT).save(pairs / "ref2" / p.name)
    refs = [str(pairs / "ref/sun.png"), str(pairs / "ref2/sun.png")]
    path = Path(
        write_config(
            tmp_path,
            tiny_edit,
            pairs,
            max_train_steps=4,
            checkpointing_steps=4,
            validation_steps=4,
            validation_num_inference_steps=1,
            validation_resolution="64x64",
            validation_prompt=["add a sun", "a circle"],
            validation_reference=[refs, ""],
        )
    )
    body = path.read_text().replace(
        'conditioning_data = ["ref"]', 'conditioning_data = ["ref", "ref2"]'
    )
    body += (
        f'\n[[datasets]]\nid = "ref2"\ninstance_data_dir = "{pairs}/ref2"\n'
        f'cache_dir_vae = "{tmp_path}/cache/ref2"\n'
        f'\n[[datasets]]\nid = "t2i"\ninstance_data_dir = "{pairs}/edit"\n'
        f'caption_strategy = "textfile"\nresolution = 128\ncache_dir_vae = "{tmp_path}/cache/t2i"\n'
    )
    path.write_text(body)
    train_cli(path)
    rows = losses(tmp_path / "out")
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows), rows
    grids = sorted((tmp_path / "out/validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000000.png", "step-000004.png"], grids


def test_validate_sees_every_ref(tiny_edit, tmp_path):
    """--ref twice gives another image than --ref once (the second reference is seen), and the same
    --ref twice in another order another still. Catches: extra --ref flags ignored."""
    for i, name in enumerate(("a.png", "b.png")):
        save_image(tmp_path / name, (64, 48), seed=i)
    common = dict(model=tiny_edit, prompt="swap them", steps=2, resolution="64x48")
    validate_cli(ref=tmp_path / "a.png", out=tmp_path / "one.png", **common)
    validate_cli(ref=[tmp_path / "a.png", tmp_path / "b.png"], out=tmp_path / "ab.png", **common)
    validate_cli(ref=[tmp_path / "b.png", tmp_path / "a.png"], out=tmp_path / "ba.png", **common)
    one, ab, ba = (np.asarray(Image.open(tmp_path / n)) for n in ("one.png", "ab.png", "ba.png"))
    assert np.abs(one.astype(int) - ab).max() > 0 and np.abs(ab.astype(int) - ba).max() > 0


def test_a_validation_reference_on_a_text_to_image_checkpoint_is_refused(tiny_t2i, tmp_path):
    """validate.py refuses --ref on a t2i checkpoint; training refuses validation_reference the same
    way, before any work. Catches the reference silently ignored (a t2i grid labelled an edit)."""
    refs = [str(EXAMPLES / "ref/sun.png")]
    keys = dict(validation_steps=2, validation_prompt=["add a sun"], validation_reference=refs)
    path = Path(write_config(tmp_path, tiny_t2i, **keys))
    body = path.read_text().split("\n[[datasets]]")[0]  # one t2i set: the targets alone
    body += (
        f'\n[[datasets]]\nid = "t2i"\ninstance_data_dir = "{EXAMPLES}/edit"\n'
        f'caption_strategy = "textfile"\nresolution = 128\ncache_dir_vae = "{tmp_path}/cache"\n'
    )
    path.write_text(body)
    result = train_cli(path, check=False)
    assert_one_line_error(result, "validation_reference is set, but the checkpoint is text-to-")
    assert not (tmp_path / "out").exists()


def test_a_validation_reference_of_another_shape_is_named_as_stretched(tiny_edit, tmp_path, capsys):
    """Validation sizes the edit by the first reference; a second of another shape is resized to
    it, and said so, naming it. Catches a silent squash."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    save_image(a, (64, 48), seed=0)
    save_image(b, (48, 64), seed=1)
    cfg = config.load_config(Path(write_config(tmp_path, tiny_edit)), [])
    cfg.validation_steps, cfg.validation_resolution = 2, "64x48"
    cfg.validation_prompt, cfg.validation_reference = ["x"], [[str(a), str(b)]]
    (val,) = data.validation_set(cfg, tmp_path, [], "edit")
    assert val["size"] == (64, 48) and [r.size for r in val["ref_images"]] == [(64, 48)] * 2
    said = capsys.readouterr().out
    assert f"warning: validation_reference {b} (48x64) is stretched by 78% to 64x48" in said, said
