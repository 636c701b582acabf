"""Masked loss (issue 21, item 3) as a specification: a masked-out token gets exactly no gradient,
the loss is the mask-weighted mean, a mask image is cropped as its target is and area-averaged to
the token grid, `mask = "difference"` derives the weights from where a pair differs, bad settings
are named, and a run trains with each. Expected weights are worked out by hand in the docstrings."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, train_cli
from PIL import Image
from test_data import RES, build, edit_config, parse
from test_train import losses, write_config

import data
import train

EXAMPLES = ROOT / "examples"


class Fixed(torch.nn.Module):
    """A stand-in transformer whose prediction is a leaf tensor, so its gradient can be read."""

    def __init__(self, pred: torch.Tensor):
        super().__init__()
        self.x_embedder = torch.nn.Linear(64, 1)  # flow_loss reads the model's dtype here
        self.pred = pred

    def forward(self, tokens, text, sigma, img_ids, txt_ids):
        return self.pred


def flow_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, ref, noise = (torch.randn(2, 16, 4, 6, generator=g) for _ in range(3))
    return x0, ref, torch.randn(2, 5, 8, generator=g), torch.tensor([0.2, 0.7]), noise


# --------------------------------------------------------------------------------------------------
# The loss


def test_a_masked_out_token_gets_exactly_zero_gradient():
    """Tokens of weight 0 get a gradient of exactly 0, every other target token a non-zero one.
    Catches: the mask applied after the mean, or not at all (the gradient leaks everywhere)."""
    x0, ref, text, sigma, noise = flow_inputs()
    n = 2 * 3  # a 4 x 6 latent: 2 x 3 tokens
    pred = torch.randn(2, 2 * n, 64, requires_grad=True)  # target and reference tokens
    mask = torch.tensor([[1.0, 0, 0.5, 0, 1, 1], [0, 0, 0, 0, 0, 0]])  # row 2 wholly masked out
    loss = train.flow_loss(Fixed(pred), x0, ref, text, sigma, noise, mask=mask)
    loss.backward()
    grad = pred.grad[:, :n].abs().amax(-1)  # (B, N): the largest |gradient| per token
    assert torch.all(grad[mask == 0] == 0), grad
    assert torch.all(grad[mask > 0] > 0), grad
    assert torch.all(pred.grad[:, n:] == 0)  # the reference tokens were never in the loss


def test_the_masked_loss_is_the_mask_weighted_mean():
    """sum(w (pred - target)^2) / sum(w) over every element, in numpy. Catches: a plain mean
    (dividing by all elements), or weights squared."""
    x0, ref, text, sigma, noise = flow_inputs(1)
    pred = torch.randn(2, 12, 64)
    mask = torch.tensor([[1.0, 0, 0.5, 0.25, 1, 0], [0, 1, 0, 0, 0, 0.75]])
    loss = train.flow_loss(Fixed(pred), x0, ref, text, sigma, noise, mask=mask)
    # the target tokens by hand: (B, 16, 2, 2, 3, 2) -> (B, 2, 3, 16, 2, 2) -> (B, 6, 64)
    v = (noise - x0).numpy().reshape(2, 16, 2, 2, 3, 2).transpose(0, 2, 4, 1, 3, 5)
    err = (pred[:, :6].numpy() - v.reshape(2, 6, 64)) ** 2
    w = mask.numpy()[:, :, None] * np.ones(64)
    want = (err * w).sum() / w.sum()
    assert abs(loss.item() - want) <= 1e-6 * want, (loss.item(), want)


# --------------------------------------------------------------------------------------------------
# Weights from a mask image, or from the difference


def mask_config(tmp: Path, masks: dict[str, Image.Image], targets: dict) -> list[dict]:
    """edit_config's sets plus a mask set `mask/` named in the edit set's conditioning_data."""
    cfg = edit_config(tmp, targets)
    (tmp / "mask").mkdir()
    for name, image in masks.items():
        image.save(tmp / "mask" / name)
    cfg[0]["conditioning_data"] = ["refs", "masks"]
    cfg.append(
        {
            "id": "masks",
            "type": "local",
            "dataset_type": "conditioning",
            "conditioning_type": "mask",
            "instance_data_dir": str(tmp / "mask"),
            "resolution": RES,
            "cache_dir_vae": str(tmp / "cache/vae/mask"),
        }
    )
    return cfg


def test_a_mask_image_is_cropped_as_its_target_and_averaged_over_each_token(tmp_path):
    """A 150 x 50 target (3:1) goes to the 96 x 48 bucket: scaled by 0.96 to 144 x 48 and 24 px cut
    off each side. Its mask is white in the middle third (x in [50, 100)): scaled [48, 96), cropped
    [24, 72); over the 16-px token columns that is 0, 0.5, 1, 1, 0.5, 0 on each of the 3 rows.
    Catches: the mask squashed instead of cropped, nearest instead of area averaging, rows and
    columns swapped."""
    mask = np.zeros((50, 150), np.uint8)
    mask[:, 50:100] = 255
    cfg = mask_config(tmp_path, {"a.png": Image.fromarray(mask)}, {"a.png": (150, 50)})
    report, _ = build(cfg, tmp_path)
    s = report.samples[0]
    assert s.bucket == (96, 48), s.bucket
    weights = data.load_file(s.entries["mask"])["mask"]
    want = torch.tensor([[0, 0.5, 1, 1, 0.5, 0]] * 3)
    assert weights.shape == want.shape, weights.shape
    assert (weights - want).abs().max() <= 0.03, weights  # Lanczos rings a little at the edges
    assert s.entries["mask"].parent == tmp_path / "cache/vae/mask"
    batch = next(iter(data.Loader(report.samples)))
    assert torch.equal(batch["mask"], weights.flatten()[None]), batch["mask"]  # pack's token order


def test_a_batch_without_masks_has_none_and_a_target_without_its_mask_is_named(tmp_path):
    """No mask set: batch["mask"] is None (the unmasked loss, bit for bit). A mask set lacking a
    target's file: one line naming it. Catches: a silent all-ones mask for a missing file."""
    report, _ = build(edit_config(tmp_path / "plain", {"a.png": (64, 64)}), tmp_path / "plain")
    assert next(iter(data.Loader(report.samples)))["mask"] is None
    white = Image.new("L", (64, 64), 255)
    cfg = mask_config(tmp_path, {"a.png": white}, {"a.png": (64, 64), "b.png": (64, 64)})
    with pytest.raises(data.DataError) as e:
        data.scan(parse(cfg, tmp_path))
    (line,) = e.value.problems
    assert "no mask of the same name" in line and "b.png" in line and "a.png" not in line, line


def test_the_difference_mask_weighs_what_changed_grown_by_the_dilation(tmp_path):
    """64 x 64 pair (its own bucket: no resampling), differing by 100 levels in the block [16, 32)²
    and by 10 (under the threshold of 16) everywhere else. Dilated by 8 px the block covers
    [8, 40)²; over 16-px tokens: (0,0) 1/4, (0,1) 1/2, (0,2) 1/4, (1,1) 1, (1,2) 1/2, (2,2) 1/4 ...
    row and column 3 nothing; weight = 0.1 + 0.9 x that. Catches: the threshold ignored, no
    dilation, the floor not applied."""
    rng = np.random.default_rng(0)
    ref = rng.integers(20, 140, (64, 64, 3), dtype=np.uint8)  # + 110 stays under 256
    target = ref + 10
    target[16:32, 16:32] += 100
    cfg = edit_config(tmp_path, {"a.png": (64, 64)}, mask="difference", mask_dilation=8)
    Image.fromarray(target).save(tmp_path / "edit/a.png")
    Image.fromarray(ref).save(tmp_path / "ref/a.png")
    report, _ = build(cfg, tmp_path)
    weights = data.load_file(report.samples[0].entries["mask"])["mask"]
    covered = torch.tensor(
        [[0.25, 0.5, 0.25, 0], [0.5, 1, 0.5, 0], [0.25, 0.5, 0.25, 0], [0, 0, 0, 0]]
    )
    want = 0.1 + 0.9 * covered
    assert (weights - want).abs().max() <= 1e-6, weights


@pytest.mark.parametrize(
    "key, value", [("mask_threshold", 40), ("mask_dilation", 0), ("mask_floor", 0.5)]
)
def test_a_changed_difference_setting_makes_a_new_mask_entry(tmp_path, key, value):
    """The cached weights are keyed by threshold, dilation and floor. Catches: a setting left out
    of the key (the old weights served after the user changed it)."""
    first, _ = build(edit_config(tmp_path, {"a.png": (64, 64)}, mask="difference"), tmp_path)
    cfg = edit_config(tmp_path, {"a.png": (64, 64)}, mask="difference", **{key: value})
    second, _ = build(cfg, tmp_path)
    assert first.samples[0].entries["mask"] != second.samples[0].entries["mask"], key


def test_a_mask_that_weighs_nothing_is_named_and_all_of_them_stop_the_run(tmp_path):
    """A black mask gives a sample no gradient at all: one warning naming it; every sample so is
    a run that would train nothing: an error. Catches a silent no-op run (the masked mean's
    clamped 0 / 0 is a loss of 0, every step)."""
    black, white = Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 255)
    sizes = {"a.png": (64, 64), "b.png": (64, 64)}
    report, _ = build(
        mask_config(tmp_path / "one", {"a.png": black, "b.png": white}, sizes), tmp_path / "one"
    )
    (line,) = [w for w in report.warnings if "train nothing" in w]
    assert line.startswith("1 sample(s) train nothing") and "edit/a.png" in line, line
    with pytest.raises(data.DataError, match="every sample trains nothing: its loss mask is 0"):
        build(
            mask_config(tmp_path / "all", {"a.png": black, "b.png": black}, sizes), tmp_path / "all"
        )


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"mask": "difference", "conditioning_data": []}, "needs a reference dataset"),
        ({"mask": "diff"}, "mask = 'diff' is not supported"),
        ({"mask_floor": 1.5}, "mask_floor = 1.5 must be in [0, 1]"),
        ({"mask_threshold": 300}, "mask_threshold = 300 must be in [0, 255]"),
    ],
)
def test_bad_mask_settings_are_named(tmp_path, keys, message):
    """Catches: a setting out of range accepted silently."""
    cfg = edit_config(tmp_path, {"a.png": (64, 64)}, **keys)
    with pytest.raises(data.DataError) as e:
        parse(cfg, tmp_path)
    assert message in "\n".join(e.value.problems), e.value.problems


# --------------------------------------------------------------------------------------------------
# A run


def test_a_run_trains_with_a_difference_mask(tiny_edit, tmp_path):
    """The example pairs with mask = "difference" train on the tiny model, and give other losses
    than without. Catches: the mask never reaching the loss."""
    path = Path(write_config(tmp_path / "masked", tiny_edit, max_train_steps=2))
    body = path.read_text().replace(
        'conditioning_data = ["ref"]', 'conditioning_data = ["ref"]\nmask = "difference"'
    )
    path.write_text(body)
    train_cli(path)
    train_cli(write_config(tmp_path / "plain", tiny_edit, max_train_steps=2))
    masked, plain = losses(tmp_path / "masked/out"), losses(tmp_path / "plain/out")
    assert len(masked) == 2 and all(np.isfinite(r["loss"]) for r in masked), masked
    assert masked[0]["loss"] != plain[0]["loss"], (masked, plain)
