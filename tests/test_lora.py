"""lora.py: invariants on a toy model, file round trips, and parity with diffusers + peft. CPU, ~15 s.

Run: python -m pytest tests/test_lora.py
"""

import copy
import json

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import ToyBlock
from torch import nn

from lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    inject_lora,
    load_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge,
    merge_and_unload,
    save_lora,
    set_lora_scale,
    unmerge,
)


class Toy(nn.Module):
    def __init__(self, d: int = 32, c: int = 16):
        super().__init__()
        self.x_embedder, self.proj_out = nn.Linear(c, d), nn.Linear(d, c)
        self.transformer_blocks = nn.ModuleList([ToyBlock(d), ToyBlock(d)])

    def forward(self, x):
        x = self.x_embedder(x)
        for block in self.transformer_blocks:
            x = block(x)
        return self.proj_out(x)


def trained_toy(rank=4, alpha=8, seed=0) -> tuple[Toy, Toy]:
    """(base, adapted): the adapted copy after a few optimizer steps on its LoRA parameters."""
    torch.manual_seed(seed)
    base = Toy()
    model = copy.deepcopy(base)
    inject_lora(model, rank=rank, alpha=alpha)
    mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(torch.randn(2, 5, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return base, model


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_inject_matches_suffixes_and_starts_equal_to_base():
    torch.manual_seed(0)
    base = Toy()
    model = copy.deepcopy(base)
    names = inject_lora(model)
    assert len(names) == 8 and "transformer_blocks.1.ff.net.0.proj" in names
    assert isinstance(model.transformer_blocks[0].attn.to_out[0], LoRALinear)
    x = torch.randn(2, 5, 16)
    assert torch.equal(model(x), base(x))
    with pytest.raises(ValueError, match="to_k"):
        inject_lora(Toy(), targets=["attn.to_k"])
    assert inject_lora(Toy(), targets=["to_q"]) == [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.to_q",
    ]


def test_only_lora_parameters_train():
    _, model = trained_toy()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert set(lora_state_dict(model)) == set(trainable)
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in trainable


def test_merge_equals_unmerged_and_unmerge_restores_base():
    base, model = trained_toy()
    x = torch.randn(2, 5, 16)
    y = model(x)
    assert max_diff(y, base(x)) > 1e-3  # training moved the output
    w0 = {k: v.clone() for k, v in model.state_dict().items() if ".base." in k}
    merge(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    merge(model)  # idempotent
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged.items())
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
    unmerge(model)
    unmerge(model)  # idempotent
    for k, v in w0.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)


def test_scale_zero_gives_the_base_exactly():
    base, model = trained_toy()
    x = torch.randn(2, 5, 16)
    y = model(x)
    set_lora_scale(model, 0.0)
    assert torch.equal(model(x), base(x))
    set_lora_scale(model, 1.0)
    assert torch.equal(model(x), y)


def test_lora_branch_runs_in_the_input_dtype():
    _, model = trained_toy()
    x = torch.randn(2, 5, 16)
    y = model(x)
    for name, p in model.named_parameters():
        if ".lora_" not in name:  # a bf16 base under float32 LoRA parameters, as in training
            p.data = p.data.bfloat16()
    y16 = model(x.bfloat16())
    assert (
        y16.dtype == torch.bfloat16
        and model.transformer_blocks[0].attn.to_q.lora_A.weight.dtype == torch.float32
    )
    assert max_diff(y16.float(), y) < 0.05, max_diff(y16.float(), y)


def test_save_load_round_trip_is_exact(tmp_path):
    """fold=False, as training checkpoints are written: B and alpha as trained, so resuming is exact."""
    base, model = trained_toy(rank=4, alpha=8)
    save_lora(tmp_path / "a.safetensors", model, metadata={"steps": 3}, fold=False)
    with safetensors.safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys and not any(
        ".alpha" in k for k in keys
    )
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 8
    assert len(config["transformer.target_modules"]) == 8 and meta["steps"] == "3"

    fresh = copy.deepcopy(base)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora_state_dict(model)})
    assert load_lora(fresh, tmp_path / "a.safetensors") == modules
    x = torch.randn(2, 5, 16)
    assert torch.equal(fresh(x), model(x))
    stored = safetensors.torch.load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(stored[f"transformer.{k}"], v) for k, v in lora_state_dict(model).items())

    resumed = copy.deepcopy(base)  # resuming: adapters injected first keep their identity (optimizer state)
    inject_lora(resumed, rank=4, alpha=8)
    params = [id(p) for p in resumed.parameters()]
    load_lora(resumed, tmp_path / "a.safetensors")
    assert [id(p) for p in resumed.parameters()] == params and torch.equal(resumed(x), model(x))


def test_the_shared_file_folds_alpha_into_b(tmp_path):
    """fold=True (the default, the file people share): B x alpha / rank, alpha = rank, no .alpha keys."""
    base, model = trained_toy(rank=4, alpha=6)
    save_lora(tmp_path / "shared.safetensors", model)
    with safetensors.safe_open(tmp_path / "shared.safetensors", framework="pt") as f:
        stored, meta = (
            {k: f.get_tensor(k) for k in f.keys()},
            json.loads(f.metadata()["lora_adapter_metadata"]),
        )
    assert (
        meta["transformer.r"] == 4
        and meta["transformer.lora_alpha"] == 4
        and not any(".alpha" in k for k in stored)
    )
    for k, v in lora_state_dict(model).items():
        expected = v * 1.5 if ".lora_B." in k else v
        assert torch.equal(stored[f"transformer.{k}"], expected), k
    fresh = copy.deepcopy(base)
    load_lora(fresh, tmp_path / "shared.safetensors")
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-6)


def test_load_rejects_a_mismatching_file(tmp_path):
    _, model = trained_toy()
    sd = lora_state_dict(model)
    sd["transformer_blocks.0.ff.net.2.lora_A.weight"] = torch.zeros(4, 32)  # ff.net.2 takes 128 inputs
    save_lora(tmp_path / "bad.safetensors", sd, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"transformer_blocks\.0\.ff\.net\.2\.lora_A\.weight.*\(4, 128\).*\(4, 32\)"
    ):
        load_lora(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing changed
    sd = {"transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 32)}
    sd["transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(32, 4)
    save_lora(tmp_path / "bad2.safetensors", sd)
    with pytest.raises(ValueError, match=r"transformer_blocks\.7\.attn\.to_q.*no module"):
        load_lora(model, tmp_path / "bad2.safetensors")


def test_unsupported_tensors_are_rejected_by_name(tmp_path):
    _, model = trained_toy()
    sd = lora_state_dict(model)
    sd["transformer_blocks.0.attn.to_q.lora_magnitude_vector"] = torch.ones(32)  # DoRA
    safetensors.torch.save_file(sd, tmp_path / "dora.safetensors")
    with pytest.raises(ValueError, match="to_q.lora_magnitude_vector"):
        load_lora(model, tmp_path / "dora.safetensors")


def test_two_files_stack_through_merge_and_unload(tmp_path):
    base, first = trained_toy(rank=4, alpha=8)
    second = copy.deepcopy(base)
    inject_lora(second, rank=2, alpha=2, targets=["attn.to_q"])
    randomise_lora_B(second)
    save_lora(tmp_path / "1.safetensors", first)
    save_lora(tmp_path / "2.safetensors", second)
    stacked = copy.deepcopy(base)
    load_lora(stacked, tmp_path / "1.safetensors")
    merge_and_unload(stacked)
    load_lora(stacked, tmp_path / "2.safetensors")
    merge_and_unload(stacked)
    w0, w1, w2 = (merge_and_unload(copy.deepcopy(m)).state_dict() for m in (base, first, second))
    for k, v in stacked.state_dict().items():
        torch.testing.assert_close(v, w1[k] + w2[k] - w0[k], rtol=0, atol=1e-6)


# ---- parity with diffusers' LongCat transformer and peft -------------------------------------------------


def tiny_longcat():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.LongCatImageTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6],
    )
    return model.eval()


def run(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    n, length = 8, 5
    img_ids = torch.stack([torch.ones(n), torch.arange(n) // 4 + length, torch.arange(n) % 4 + length], -1)
    txt_ids = torch.arange(length)[:, None].float().repeat(1, 3) * torch.tensor([0.0, 1, 1])
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, n, 64, generator=g),
            encoder_hidden_states=torch.randn(1, length, 32, generator=g),
            timestep=torch.tensor([0.7]),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]


def randomise_lora_B(model):
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1


def loaded_everywhere(path, base) -> dict[str, torch.Tensor]:
    """The output of `base` with the LoRA file at `path` applied by each loader a user may meet."""
    import peft
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    outs = {}
    for name, kw in (
        ("diffusers load_lora_adapter", {}),
        ("... use_safetensors=True", {"use_safetensors": True}),
    ):
        theirs = copy.deepcopy(base)
        theirs.load_lora_adapter(path, prefix="transformer", **kw)
        outs[name] = run(theirs)
    # the Flux-family pipeline loaders (load_lora_weights): alphas and metadata read from the file, applied
    sd, alphas, meta = FluxLoraLoaderMixin.lora_state_dict(
        path, return_alphas=True, return_lora_metadata=True
    )
    flux = copy.deepcopy(base)
    FluxLoraLoaderMixin.load_lora_into_transformer(sd, network_alphas=alphas, transformer=flux, metadata=meta)
    outs["Flux-style lora_state_dict + load_lora_into_transformer"] = run(flux)
    # peft by hand: its LoraConfig from the file's metadata
    with safetensors.safe_open(path, framework="pt") as f:
        tensors, config = (
            {k: f.get_tensor(k) for k in f.keys()},
            json.loads(f.metadata()["lora_adapter_metadata"]),
        )
    with_peft = copy.deepcopy(base)
    peft.inject_adapter_in_model(
        peft.LoraConfig(**{k.removeprefix("transformer."): v for k, v in config.items()}), with_peft
    )
    peft.set_peft_model_state_dict(with_peft, {k.removeprefix("transformer."): v for k, v in tensors.items()})
    outs["peft"] = run(with_peft)
    # ComfyUI arithmetic (comfy/weight_adapter/lora.py): W += (alpha / rank if <key>.alpha, else 1) up @ down
    # on the module the `transformer.<diffusers name>` key names (comfy/lora.py); metadata is not read
    comfy = copy.deepcopy(base)
    for key in (k for k in tensors if k.endswith(".lora_A.weight")):
        module = key.removesuffix(".lora_A.weight")
        down, up = tensors[key], tensors[f"{module}.lora_B.weight"]
        scale = tensors[f"{module}.alpha"].item() / down.shape[0] if f"{module}.alpha" in tensors else 1.0
        comfy.get_submodule(module.removeprefix("transformer.")).weight.data += scale * up @ down
    outs["ComfyUI"] = run(comfy)
    ours = copy.deepcopy(base)
    load_lora(ours, path)
    outs["validate.py (lora.load_lora)"] = run(ours)
    return outs


def test_our_file_applies_identically_in_every_loader_with_alpha_not_rank(tmp_path):
    base = tiny_longcat()
    model = copy.deepcopy(base)
    assert len(inject_lora(model, rank=4, alpha=6)) == 15  # 12 in the joint block, q/k/v in the single one
    randomise_lora_B(model)
    want = run(model)
    save_lora(tmp_path / "pytorch_lora_weights.safetensors", model)
    outs = loaded_everywhere(tmp_path / "pytorch_lora_weights.safetensors", base)
    assert (want - run(base)).abs().max() > 1e-2  # the LoRA matters
    for loader, got in outs.items():
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-6, msg=lambda m, loader=loader: f"{loader}: {m}"
        )


@pytest.mark.parametrize("layout", ["save_lora_adapter", "save_lora_weights", "peft_save_pretrained"])
def test_peft_lora_loads_with_peft_outputs(tmp_path, layout):
    peft = pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    base = tiny_longcat()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS), init_lora_weights=True)
    theirs = copy.deepcopy(base)
    if (
        layout == "peft_save_pretrained"
    ):  # the official LongCat recipe: base_model.model.* + adapter_config.json
        wrapped = peft.get_peft_model(theirs, config)
        randomise_lora_B(theirs)
        wrapped.save_pretrained(tmp_path)
    else:
        theirs.add_adapter(config)
        randomise_lora_B(theirs)
        if layout == "save_lora_adapter":  # bare module names, unprefixed metadata
            theirs.save_lora_adapter(tmp_path)
        else:  # transformer.* names and metadata, as the Flux pipelines write them
            FluxLoraLoaderMixin.save_lora_weights(
                tmp_path,
                transformer_lora_layers=peft.get_peft_model_state_dict(theirs),
                transformer_lora_adapter_metadata=config.to_dict(),
            )
    ours = copy.deepcopy(base)
    assert len(load_lora(ours, tmp_path)) == 15
    torch.testing.assert_close(run(ours), run(theirs), rtol=1e-5, atol=1e-6)
