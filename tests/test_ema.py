"""EMA of the adapter (issue 21, item 4) as a specification: the shadow follows diffusers' EMAModel
(the oracle) update for update, an interrupted and resumed run's EMA equals a straight run's, the
EMA is shared as its own LoRA file, and validation shows base, trained and EMA side by side."""

from pathlib import Path

import pytest
import torch
from conftest import train_cli
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file
from test_train import EXAMPLES, fails, write_config

import lora
import model as M
import train


class Adapter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.frozen = torch.nn.Linear(3, 3).requires_grad_(False)


def test_the_shadow_follows_diffusers_ema_model_update_for_update():
    """Ten updates with decay 0.9 (the schedule's min(decay, (1 + s) / (10 + s)) reaches it at s =
    80, so every update is on the warm-up part): our shadow equals diffusers' shadow_params. Catches:
    the schedule off by one update, the first update not a copy, the frozen tensors averaged."""
    torch.manual_seed(0)
    net = Adapter()
    ours = train.AdapterEMA(net, decay=0.9)
    theirs = EMAModel([p for p in net.parameters() if p.requires_grad], decay=0.9)
    for _ in range(10):
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        ours.update()
        theirs.step([p for p in net.parameters() if p.requires_grad])
    assert ours.shadow.keys() == {"a.weight", "a.bias"}
    for name, want in zip(ours.shadow, theirs.shadow_params, strict=True):
        diff = (ours.shadow[name] - want).abs().max().item()
        assert diff <= 1e-7, f"{name}: max difference {diff:.3g}"


def test_applied_puts_the_ema_in_place_and_restores_the_trained_weights_exactly():
    """Catches: the trained weights left as the EMA after validation or saving."""
    net = Adapter()
    ema = train.AdapterEMA(net, decay=0.5)
    before = net.a.weight.detach().clone()
    ema.update()  # the first update copies the weights
    with torch.no_grad():
        net.a.weight.add_(1.0)
    ema.update()  # the second keeps 2/11 of them
    trained = net.a.weight.detach().clone()
    with ema.applied():
        assert torch.equal(net.a.weight, ema.shadow["a.weight"])
        assert not torch.equal(net.a.weight, trained) and not torch.equal(net.a.weight, before)
    assert torch.equal(net.a.weight, trained)


def test_an_interrupted_and_resumed_ema_equals_a_straight_run(tiny_edit, tmp_path):
    """6 steps straight vs 3 then a resume to 6, EMA every 2 steps: the same EMA file, bit for bit,
    different from the trained LoRA, and loadable as a LoRA. Catches: the EMA re-initialised on
    resume (from the resumed weights) or its update count lost (another decay)."""
    keys = dict(use_ema=True, ema_decay=0.9, ema_update_interval=2, checkpointing_steps=3)
    train_cli(write_config(tmp_path / "a", tiny_edit, max_train_steps=6, **keys))
    cfg = write_config(tmp_path / "b", tiny_edit, max_train_steps=3, **keys)
    train_cli(cfg)
    train_cli(cfg, max_train_steps=6)
    name = "pytorch_lora_weights_ema.safetensors"
    a, b = load_file(str(tmp_path / "a/out" / name)), load_file(str(tmp_path / "b/out" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = load_file(str(tmp_path / "a/out/pytorch_lora_weights.safetensors"))
    assert trained.keys() == a.keys()  # the LoRA file's format
    assert any(not torch.equal(trained[k], a[k]) for k in a)
    transformer = M.load_transformer(tiny_edit, torch.float32)
    assert lora.load_lora(transformer, tmp_path / "a/out" / name)


def test_validation_shows_base_trained_and_ema_side_by_side(tiny_edit, tmp_path):
    """One row: reference | base | trained | ema, each 64 px wide; at step 0 all three are the
    same image (LoRA B starts at zero, the EMA starts at the weights). Catches: a version missing,
    or base drawn with the adapter on."""
    cfg = write_config(
        tmp_path,
        tiny_edit,
        max_train_steps=2,
        validation_steps=2,
        validation_num_inference_steps=1,
        validation_resolution="64x64",
        validation_prompt="add a sun",
        validation_reference=str(EXAMPLES / "ref/sun.png"),
        use_ema=True,
        validation_show=["base", "trained", "ema"],
    )
    train_cli(cfg)
    grid = Image.open(Path(tmp_path) / "out/validation/step-000000.png")
    assert grid.size[0] == 4 * 64, grid.size
    assert Image.open(Path(tmp_path) / "out/validation/step-000002.png").size == grid.size


@pytest.mark.parametrize(
    "key, message",
    [
        ("--ema_decay=1.0", "ema_decay = 1.0: must be in [0, 1)"),
        ("--ema_update_interval=0", "ema_update_interval = 0: must be at least 1"),
        ('--validation_show=["ema"]', 'validation_show includes "ema": set use_ema = true'),
        ('--validation_show=["best"]', "validation_show = ['best']"),
    ],
)
def test_bad_ema_settings_are_named(tiny_edit, tmp_path, key, message):
    """Catches: a decay of 1 (nothing ever learnt) or an EMA column without an EMA accepted."""
    assert message in fails([write_config(tmp_path, tiny_edit), key])


def test_an_ema_that_is_never_updated_is_said(tiny_edit, tmp_path):
    """ema_update_interval past the run's last step: the EMA file would be the adapter as it
    started, so the run says so. Catches a silent EMA of zero updates."""
    keys = dict(use_ema=True, ema_update_interval=3, max_train_steps=2, checkpointing_steps=2)
    said = train_cli(write_config(tmp_path, tiny_edit, **keys)).stdout
    assert "warning: ema_update_interval = 3 and max_train_steps = 2" in said, said
    assert "the EMA is never updated" in said, said
