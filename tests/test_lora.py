"""lora.py: invariants on a toy model, file round trips, parity with diffusers + peft, ComfyUI's
arithmetic and LyCORIS (when installed), and every scale rule of other tools' files. CPU, ~60 s.

Run: python -m pytest tests/test_lora.py
"""

import copy
import json
import re
from dataclasses import replace

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import ToyBlock
from torch import nn

from lora import (
    DEFAULT_TARGETS,
    LINEAR_TARGETS,
    LoKrLinear,
    LoKrSettings,
    LoRALinear,
    factorization,
    inject_lokr,
    inject_lora,
    load_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge,
    merge_and_unload,
    parse_lycoris_config,
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
    """fold=False, as training checkpoints are written: B and alpha as trained; exact resume."""
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
    assert all(
        torch.equal(stored[f"transformer.{k}"], v) for k, v in lora_state_dict(model).items()
    )

    resumed = copy.deepcopy(
        base
    )  # resuming: adapters injected first keep their identity (optimizer state)
    inject_lora(resumed, rank=4, alpha=8)
    params = [id(p) for p in resumed.parameters()]
    load_lora(resumed, tmp_path / "a.safetensors")
    assert [id(p) for p in resumed.parameters()] == params and torch.equal(resumed(x), model(x))


def test_the_shared_file_folds_alpha_into_b(tmp_path):
    """fold=True (the default, the shared file): B x alpha / rank, alpha = rank, no .alpha keys."""
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
    sd["transformer_blocks.0.ff.net.2.lora_A.weight"] = torch.zeros(
        4, 32
    )  # ff.net.2 takes 128 inputs
    save_lora(tmp_path / "bad.safetensors", sd, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"transformer_blocks\.0\.ff\.net\.2\.lora_A\.weight.*\(4, 128\).*\(4, 32\)",
    ):
        load_lora(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing changed
    sd = {"transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 32)}
    sd["transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(32, 4)
    save_lora(tmp_path / "bad2.safetensors", sd)
    with pytest.raises(ValueError, match=r"transformer_blocks\.7\.attn\.to_q.*no module"):
        load_lora(model, tmp_path / "bad2.safetensors")


@pytest.mark.parametrize(
    "metadata, message",
    [
        ("[1, 2]", "a JSON object of peft settings, not list"),
        ('{"lora_alpha": null}', "lora_alpha = None: not a finite number"),
        ('{"lora_alpha": "abc"}', "lora_alpha = 'abc': not a finite number"),
        ('{"lora_alpha": NaN}', "lora_alpha = nan: not a finite number"),
        ('{"lora_alpha": 1e300}', "lora_alpha = 1e+300: not a finite number"),
        ('{"alpha_pattern": ["a"]}', "alpha_pattern = ['a']: not a mapping of names to numbers"),
        ('{"use_rslora": "false"}', "use_rslora = 'false': true or false"),
    ],
)
def test_bad_peft_settings_are_named_before_anything_changes(tmp_path, metadata, message):
    """peft settings in a file's metadata are read as they are used: each bad one is a line naming
    it, not a traceback, a late "not finite" or (use_rslora "false") a silent alpha / sqrt(r)."""
    _, model = trained_toy()
    path = tmp_path / "lora.safetensors"
    tensors = {f"transformer.{k}": v for k, v in lora_state_dict(model).items()}
    safetensors.torch.save_file(tensors, path, metadata={"lora_adapter_metadata": metadata})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_lora(model, path)
    assert str(e.value) == f"{path}: lora_adapter_metadata: {message}", str(e.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_tensor_named_twice_a_huge_alpha_or_a_rank_zero_lora_is_refused(tmp_path):
    """Catches the second spelling of a module's tensor silently winning over the first, an alpha
    that overflows only once sampling has run, and a ZeroDivisionError for a rank-0 LoRA."""
    _, model = trained_toy()
    sd = lora_state_dict(model)
    twice = {f"transformer.{k}": v for k, v in sd.items()}
    twice["base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.ones(32, 4)
    safetensors.torch.save_file(twice, tmp_path / "twice.safetensors")
    with pytest.raises(
        ValueError, match="to_q.lora_B.weight and .*to_q.lora_B.weight are the same"
    ):
        load_lora(model, tmp_path / "twice.safetensors")
    huge = {**sd, "transformer_blocks.0.attn.to_q.alpha": torch.tensor(1e300, dtype=torch.float64)}
    safetensors.torch.save_file(huge, tmp_path / "huge.safetensors")
    with pytest.raises(ValueError, match=r"to_q\.alpha: alpha 1e\+300 is out of range"):
        load_lora(model, tmp_path / "huge.safetensors")
    sd["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(0, 32)
    sd["transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.zeros(32, 0)
    safetensors.torch.save_file(sd, tmp_path / "rank0.safetensors")
    with pytest.raises(ValueError, match=r"to_q\.lora_A\.weight: rank 0 \(no rows\)"):
        load_lora(model, tmp_path / "rank0.safetensors")


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


# ---- parity with diffusers' LongCat transformer and peft -----------------------------------------


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
    img_ids = torch.stack(
        [torch.ones(n), torch.arange(n) // 4 + length, torch.arange(n) % 4 + length], -1
    )
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
    # the Flux-family pipeline loaders (load_lora_weights): the file's alphas and metadata, applied
    sd, alphas, meta = FluxLoraLoaderMixin.lora_state_dict(
        path, return_alphas=True, return_lora_metadata=True
    )
    flux = copy.deepcopy(base)
    FluxLoraLoaderMixin.load_lora_into_transformer(
        sd, network_alphas=alphas, transformer=flux, metadata=meta
    )
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
    peft.set_peft_model_state_dict(
        with_peft, {k.removeprefix("transformer."): v for k, v in tensors.items()}
    )
    outs["peft"] = run(with_peft)
    # ComfyUI arithmetic (comfy/weight_adapter/lora.py): W += (alpha / rank if <key>.alpha, else 1)
    # up @ down on the module the `transformer.<diffusers name>` key names (comfy/lora.py); metadata
    # is not read
    comfy = copy.deepcopy(base)
    for key in (k for k in tensors if k.endswith(".lora_A.weight")):
        module = key.removesuffix(".lora_A.weight")
        down, up = tensors[key], tensors[f"{module}.lora_B.weight"]
        scale = (
            tensors[f"{module}.alpha"].item() / down.shape[0]
            if f"{module}.alpha" in tensors
            else 1.0
        )
        comfy.get_submodule(module.removeprefix("transformer.")).weight.data += scale * up @ down
    outs["ComfyUI"] = run(comfy)
    ours = copy.deepcopy(base)
    load_lora(ours, path)
    outs["validate.py (lora.load_lora)"] = run(ours)
    return outs


def test_our_file_applies_identically_in_every_loader_with_alpha_not_rank(tmp_path):
    base = tiny_longcat()
    model = copy.deepcopy(base)
    assert (
        len(inject_lora(model, rank=4, alpha=6)) == 15
    )  # 12 in the joint block, q/k/v in the single one
    randomise_lora_B(model)
    want = run(model)
    save_lora(tmp_path / "pytorch_lora_weights.safetensors", model)
    outs = loaded_everywhere(tmp_path / "pytorch_lora_weights.safetensors", base)
    assert (want - run(base)).abs().max() > 1e-2  # the LoRA matters
    for loader, got in outs.items():
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-6, msg=lambda m, loader=loader: f"{loader}: {m}"
        )


@pytest.mark.parametrize(
    "layout", ["save_lora_adapter", "save_lora_weights", "peft_save_pretrained"]
)
def test_peft_lora_loads_with_peft_outputs(tmp_path, layout):
    peft = pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    base = tiny_longcat()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS), init_lora_weights=True
    )
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


# ---- every scale rule of the LoRA files other tools write (read_lora / load_lora) ----------------

SCALE_A = "transformer_blocks.0.attn.to_q"  # (32, 32)
SCALE_B = "transformer_blocks.1.ff.net.2"  # (32, 128)


def lora_pair(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (A, B) of rank 4 for one of the Toy modules."""
    g = torch.Generator().manual_seed(seed)
    fan_in = 128 if name == SCALE_B else 32
    return torch.randn(4, fan_in, generator=g), torch.randn(32, 4, generator=g) * 0.1


def write_form(folder, form: str) -> tuple[str, dict[str, float]]:
    """A LoRA file in one of the forms read_lora accepts, and the scale that form's own rule gives
    each module (rank 4), written here from the tools' documented rules, not from lora.py."""
    (a1, b1), (a2, b2) = lora_pair(SCALE_A, 1), lora_pair(SCALE_B, 2)
    pairs = {SCALE_A: (a1, b1), SCALE_B: (a2, b2)}
    tensors, meta, beside = {}, None, None
    if form in ("diffusers, no alpha anywhere", "diffusers + lora_adapter_metadata", ".alpha wins"):
        for m, (a, b) in pairs.items():
            tensors[f"transformer.{m}.lora_A.weight"], tensors[f"transformer.{m}.lora_B.weight"] = (
                a,
                b,
            )
        if (
            form != "diffusers, no alpha anywhere"
        ):  # peft's LoraConfig in the metadata: lora_alpha / r
            config = {"transformer.r": 4, "transformer.lora_alpha": 6}
            meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
        if (
            form == ".alpha wins"
        ):  # a kohya-style .alpha tensor beside metadata names that module's alpha
            tensors[f"transformer.{SCALE_A}.alpha"] = torch.tensor(2.0)
        scales = {
            "diffusers, no alpha anywhere": {
                SCALE_A: 1.0,
                SCALE_B: 1.0,
            },  # peft: alpha defaults to r
            "diffusers + lora_adapter_metadata": {SCALE_A: 6 / 4, SCALE_B: 6 / 4},
            ".alpha wins": {SCALE_A: 2 / 4, SCALE_B: 6 / 4},
        }[form]
    elif form.startswith(
        "peft"
    ):  # save_pretrained: base_model.model.*.lora_A.weight + adapter_config.json
        for m, (a, b) in pairs.items():
            tensors[f"base_model.model.{m}.lora_A.weight"] = a
            tensors[f"base_model.model.{m}.lora_B.weight"] = b
        beside = {"r": 4, "lora_alpha": 6, "alpha_pattern": {"ff.net.2": 10}}
        beside["use_rslora"] = form == "peft + use_rslora"
        # peft: alpha_pattern by module-name suffix, else lora_alpha; rsLoRA divides by sqrt(r)
        r = 2.0 if beside["use_rslora"] else 4.0
        scales = {SCALE_A: 6 / r, SCALE_B: 10 / r}
    elif form in (
        "kohya lora_down/lora_up/alpha",
        "ComfyUI diffusion_model. + alpha",
        "LyCORIS LoRA",
    ):
        prefix = {"kohya lora_down/lora_up/alpha": "", "LyCORIS LoRA": "lycoris_"}.get(form)
        prefix = "diffusion_model." if prefix is None else prefix
        for m, (a, b) in pairs.items():
            name = prefix + (m.replace(".", "_") if prefix == "lycoris_" else m)
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = torch.tensor(3.0 if m == SCALE_A else 8.0)
        scales = {SCALE_A: 3 / 4, SCALE_B: 8 / 4}  # kohya / ComfyUI / LyCORIS: alpha / r per module
    path = folder / "adapter_model.safetensors"
    safetensors.torch.save_file(tensors, path, metadata=meta)
    if beside is not None:
        (folder / "adapter_config.json").write_text(json.dumps(beside))
    return str(path), scales


@pytest.mark.parametrize(
    "form",
    [
        "diffusers, no alpha anywhere",
        "diffusers + lora_adapter_metadata",
        ".alpha wins",
        "peft adapter_config.json + alpha_pattern",
        "peft + use_rslora",
        "kohya lora_down/lora_up/alpha",
        "ComfyUI diffusion_model. + alpha",
        "LyCORIS LoRA",
    ],
)
def test_each_file_form_keeps_its_scale_rule(tmp_path, form):
    torch.manual_seed(0)
    base = Toy()
    path, scales = write_form(tmp_path, form)
    model = copy.deepcopy(base)
    assert load_lora(model, path) == sorted(scales)
    expected = copy.deepcopy(base)  # W + s * B @ A on the bare model, s from the form's own rule
    with torch.no_grad():
        for name, s in scales.items():
            a, b = lora_pair(name, 1 if name == SCALE_A else 2)
            expected.get_submodule(name).weight += s * b @ a
    x = torch.randn(2, 5, 16)
    got, want = model(x), expected(x)
    assert (want - base(x)).abs().max() > 1e-2  # the file matters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"{form}: {m}")


# ---- LoKr (LyCORIS) ----------------------------------------------------------------------------


def lokr(**kw) -> LoKrSettings:
    return LoKrSettings(**{"linear_dim": 2, "linear_alpha": 3.0, "factor": -1, **kw})


def randomise_lokr(model, seed=2):
    """Every LoKr tensor random (training would get there), so the whole formula is exercised."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lokr_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3


def test_factorization_is_lycoris():
    """Values of LyCORIS's lycoris/functional/general.py factorization (its own docstring table is
    older than its code: 360 with factor 16 gives (15, 24) there)."""
    cases = {
        (3072, 16): (16, 192),  # SimpleTuner's example on LongCat's width
        (12288, 16): (16, 768),
        (3072, -1): (48, 64),
        (128, -1): (8, 16),
        (1024, -1): (32, 32),
        (127, -1): (1, 127),
        (128, 4): (4, 32),  # a dividing factor is taken as it is ...
        (64, 16): (4, 16),  # ... even past the square root, then sorted
        (360, 16): (15, 24),  # otherwise the largest divisor at most sqrt(dim) and factor
        (250, 8): (5, 50),
    }
    assert {k: factorization(*k) for k in cases} == cases


@pytest.mark.parametrize(
    "settings, w1, w2, scale",
    [
        (lokr(factor=4), (4, 4), ((5, 2), (2, 6)), 3 / 2),  # r = 2 < max(5, 6) / 2: w2 split
        (lokr(factor=4, linear_dim=3), (4, 4), (5, 6), 1.0),  # 3 is not < 3: whole, alpha ignored
        (lokr(factor=4, full_matrix=True), (4, 4), (5, 6), 1.0),
        (lokr(factor=-1, linear_alpha=0), (4, 4), ((5, 2), (2, 6)), 1.0),  # alpha 0 means alpha = r
    ],
)
def test_lokr_update_is_the_scaled_kronecker_product(settings, w1, w2, scale):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 20))  # out 20 = 4 * 5, in 24 = 4 * 6
    model = copy.deepcopy(base)
    assert inject_lokr(model, replace(settings, targets=("0",))) == ["0"]
    layer = model[0]
    randomise_lokr(model)
    if isinstance(w2[0], tuple):
        shapes = (layer.lokr_w1.shape, layer.lokr_w2_a.shape, layer.lokr_w2_b.shape)
        assert shapes == (w1, *w2) and not hasattr(layer, "lokr_w2")
        w2_full = layer.lokr_w2_a @ layer.lokr_w2_b
    else:
        assert (layer.lokr_w1.shape, layer.lokr_w2.shape) == (w1, w2)
        w2_full = layer.lokr_w2
    delta = scale * torch.kron(layer.lokr_w1, w2_full)  # (20, 24): block (i, j) is w1[i, j] * w2
    x = torch.randn(3, 7, 24)
    torch.testing.assert_close(model(x), base(x) + x @ delta.T, rtol=0, atol=1e-5)
    set_lora_scale(model, 0.5)
    torch.testing.assert_close(model(x), base(x) + 0.5 * x @ delta.T, rtol=0, atol=1e-5)


def trained_lokr_toy(settings: LoKrSettings, seed=0) -> tuple[Toy, Toy]:
    """(base, adapted): the LoKr copy after a few optimizer steps on its LoKr parameters."""
    torch.manual_seed(seed)
    base = Toy()
    model = copy.deepcopy(base)
    inject_lokr(model, settings)
    mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(torch.randn(2, 5, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return base, model


def test_lokr_starts_at_zero_and_only_lokr_trains():
    torch.manual_seed(0)
    base = Toy()
    model = copy.deepcopy(base)
    assert len(inject_lokr(model, lokr())) == 8
    x = torch.randn(2, 5, 16)
    assert torch.equal(model(x), base(x))
    q = model.transformer_blocks[0].attn.to_q
    # LyCORIS's init: the w2 side's last factor is zero, w1 and w2_a are Kaiming-uniform, not zero
    assert (
        q.lokr_w2_b.abs().max() == 0 and q.lokr_w1.abs().min() > 0 and q.lokr_w2_a.abs().min() > 0
    )
    mark_only_lora_as_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 24 and all(".lokr_w" in n for n in trainable)
    assert set(lora_state_dict(model)) == set(trainable)
    _, trained = trained_lokr_toy(lokr())
    assert max_diff(trained(x), base(x)) > 1e-3  # the gradient reaches the zero factor
    with pytest.raises(ValueError, match="to_q already has a LoKr adapter"):
        inject_lora(model, targets=["to_q"])


def test_lokr_merge_equals_unmerged_and_unmerge_restores_base():
    base, model = trained_lokr_toy(lokr())
    x = torch.randn(2, 5, 16)
    set_lora_scale(model, 0.0)
    assert torch.equal(model(x), base(x))
    set_lora_scale(model, 0.7)
    y = model(x)
    w0 = {k: v.clone() for k, v in model.state_dict().items() if ".base." in k}
    merge(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    merge(model)  # idempotent
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged.items())
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
    unmerge(model)
    unmerge(model)
    for k, v in w0.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(merge_and_unload(model)(x), y, rtol=0, atol=1e-5)
    assert not any(".lokr_" in k for k in model.state_dict())


def test_lokr_wraps_a_quantized_base():
    import quant

    torch.manual_seed(0)
    model = Toy()
    quant.quantize_model(model, "int8", targets=[r"transformer_blocks"])
    base = copy.deepcopy(model)
    inject_lokr(model, lokr())
    randomise_lokr(model)
    x = torch.randn(2, 5, 16)
    y = model(x)
    layer = model.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base, quant.QuantLinear) and max_diff(y, base(x)) > 1e-2
    merge(model)  # dequantize, add, requantize: within int8 rounding of the unmerged output
    assert max_diff(model(x), y) < 0.05, max_diff(model(x), y)


def test_lokr_save_load_round_trip_is_exact(tmp_path):
    """A resume reloads the trained LoKr exactly: same tensors, alpha, scale and outputs."""
    settings = lokr(linear_alpha=0.3)  # not a float32 number: the file's alpha must be exact
    base, model = trained_lokr_toy(settings)
    save_lora(tmp_path / "lokr.safetensors", model, metadata={"step": 3})
    stored = safetensors.torch.load_file(tmp_path / "lokr.safetensors")
    for k, v in lora_state_dict(model).items():
        module, part = k.rsplit(".", 1)
        assert torch.equal(stored[f"lycoris_{module.replace('.', '_')}.{part}"], v), k
    alpha = stored["lycoris_transformer_blocks_0_attn_to_q.alpha"]
    assert alpha.dtype == torch.float64 and alpha.item() == 0.3 and alpha.ndim == 0
    assert len(stored) == 8 * 4  # w1, w2_a, w2_b and alpha for each of the 8 modules

    resumed = copy.deepcopy(base)  # as train.py resumes: inject, then load into the same layers
    inject_lokr(resumed, settings)
    params = [id(p) for p in resumed.parameters()]
    modules = sorted({k.rsplit(".lokr_", 1)[0] for k in lora_state_dict(model)})
    assert load_lora(resumed, tmp_path / "lokr.safetensors") == modules
    assert [id(p) for p in resumed.parameters()] == params
    for name in modules:
        m, theirs = model.get_submodule(name), resumed.get_submodule(name)
        assert isinstance(theirs, LoKrLinear), name
        assert (theirs.alpha, theirs.scale) == (m.alpha, m.scale) == (0.3, 0.15), name
    x = torch.randn(2, 5, 16)
    assert torch.equal(resumed(x), model(x))
    fresh = copy.deepcopy(base)  # validate.py --lora: adapters injected by the loader
    load_lora(fresh, tmp_path / "lokr.safetensors")
    assert torch.equal(fresh(x), model(x))
    # from a state dict (an EMA copy, say), alpha given once, as for a LoRA state dict
    save_lora(tmp_path / "state.safetensors", lora_state_dict(model), alpha=0.3)
    assert safetensors.torch.load_file(tmp_path / "state.safetensors").keys() == stored.keys()
    load_lora(fresh, tmp_path / "state.safetensors")
    assert torch.equal(fresh(x), model(x))


def comfy_lokr_weight(tensors: dict, key: str, weight: torch.Tensor) -> torch.Tensor:
    """ComfyUI's LoKr arithmetic, written out from comfy/weight_adapter/lokr.py (LoKrAdapter.
    calculate_weight, strength 1): w1 and w2 rebuilt from their halves, alpha / dim with dim the
    rank of the split factor (w2's when both are), 1.0 when neither is split or there is no alpha,
    and W + alpha * kron(w1, w2).reshape(W.shape)."""
    get = tensors.get
    w1, w2, dim = get(f"{key}.lokr_w1"), get(f"{key}.lokr_w2"), None
    if w1 is None:
        dim = get(f"{key}.lokr_w1_b").shape[0]
        w1 = get(f"{key}.lokr_w1_a").float() @ get(f"{key}.lokr_w1_b").float()
    if w2 is None:
        dim = get(f"{key}.lokr_w2_b").shape[0]
        w2 = get(f"{key}.lokr_w2_a").float() @ get(f"{key}.lokr_w2_b").float()
    alpha = get(f"{key}.alpha")
    alpha = alpha.item() / dim if alpha is not None and dim is not None else 1.0
    return weight + alpha * torch.kron(w1.float(), w2.float()).reshape(weight.shape)


def comfy_applies(path, base: nn.Module) -> nn.Module:
    """`base` patched as ComfyUI patches it: comfy/lora.py model_lora_keys_unet maps each diffusers
    weight `k` of a Flux-family model (LongCatImage is one) to the key `lycoris_` + k without
    `.weight`, '.' replaced by '_'."""
    tensors = safetensors.torch.load_file(path)
    keys = {k.rsplit(".", 1)[0] for k in tensors}
    patched = copy.deepcopy(base)
    for name, m in patched.named_modules():
        key = "lycoris_" + name.replace(".", "_")
        if isinstance(m, nn.Linear) and key in keys:
            keys.remove(key)
            m.weight.data = comfy_lokr_weight(tensors, key, m.weight.data)
    assert not keys, f"keys ComfyUI would not map: {sorted(keys)}"
    return patched


@pytest.mark.parametrize("settings", ["SimpleTuner's example", "w2 split"])
def test_our_lokr_file_applies_as_comfyui_computes_it(tmp_path, settings):
    base = tiny_longcat()
    model = copy.deepcopy(base)
    if settings == "SimpleTuner's example":
        lokr_settings = parse_lycoris_config(SIMPLETUNER_LOKR)[0]
    else:
        lokr_settings = lokr(linear_dim=2, linear_alpha=3.0, factor=4)
    names = inject_lokr(model, lokr_settings)
    randomise_lokr(model)
    want = run(model)
    save_lora(tmp_path / "pytorch_lora_weights.safetensors", model)
    comfy = comfy_applies(tmp_path / "pytorch_lora_weights.safetensors", base)
    ours = copy.deepcopy(base)
    assert load_lora(ours, tmp_path / "pytorch_lora_weights.safetensors") == sorted(names)
    assert (want - run(base)).abs().max() > 1e-2
    torch.testing.assert_close(run(comfy), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(ours), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layout",
    ["w2 split, float16", "w1 and w2 split (decompose_both)", "only w1 split", "no alpha"],
)
def test_lycoris_written_lokr_files_load_as_comfyui_applies_them(tmp_path, layout):
    """Files in the layouts LyCORIS's LokrModule writes (custom_state_dict), built here by hand."""
    torch.manual_seed(0)
    base = Toy()
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for name, (out_f, in_f) in {SCALE_A: (32, 32), SCALE_B: (32, 128)}.items():
        key = "lycoris_" + name.replace(".", "_")
        (a, b), (c, d) = factorization(out_f, 4), factorization(in_f, 4)
        w1 = {"lokr_w1": (a, c)} if layout in ("w2 split, float16", "no alpha") else None
        w1 = w1 or {"lokr_w1_a": (a, 2), "lokr_w1_b": (2, c)}
        w2 = (
            {"lokr_w2": (b, d)}
            if layout == "only w1 split"
            else {"lokr_w2_a": (b, 3), "lokr_w2_b": (3, d)}
        )
        for part, shape in {**w1, **w2}.items():
            tensors[f"{key}.{part}"] = torch.randn(shape, generator=g) * 0.3
        if layout != "no alpha":
            tensors[f"{key}.alpha"] = torch.tensor(5.0)
    if layout == "w2 split, float16":
        tensors = {k: v.half() for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, tmp_path / "theirs.safetensors")
    model = copy.deepcopy(base)
    assert load_lora(model, tmp_path / "theirs.safetensors") == [SCALE_A, SCALE_B]
    x = torch.randn(2, 5, 16)
    want = comfy_applies(tmp_path / "theirs.safetensors", base)(x)
    assert (want - base(x)).abs().max() > 1e-2
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_lokr_matches_lycoris_itself(tmp_path):
    """LyCORIS on diffusers' model with SimpleTuner's example config: the same seed gives the same
    initial tensors, and each side's file gives the other the same outputs. Needs lycoris-lora."""
    lycoris = pytest.importorskip("lycoris")
    base = tiny_longcat()
    theirs = copy.deepcopy(base)
    config = json.loads(json.dumps(SIMPLETUNER_LOKR))
    lycoris.LycorisNetwork.apply_preset(config.pop("apply_preset"))  # as SimpleTuner's trainer does
    torch.manual_seed(5)
    dims = [config.pop(k) for k in ("multiplier", "linear_dim", "linear_alpha")]
    network = lycoris.create_lycoris(theirs, *dims, **config)
    network.apply_to()
    ours = copy.deepcopy(base)
    torch.manual_seed(5)
    names = inject_lokr(ours, parse_lycoris_config(SIMPLETUNER_LOKR)[0])
    state = network.state_dict()
    assert len(names) == len(network.loras) == 26
    for name in names:
        key = "lycoris_" + name.replace(".", "_")
        layer = ours.get_submodule(name)
        assert torch.equal(state[f"{key}.lokr_w1"], layer.lokr_w1), name
        assert torch.equal(state[f"{key}.lokr_w2"], layer.lokr_w2), name
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    want = run(theirs)
    network.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float32, {})
    load_lora(ours, tmp_path / "lycoris.safetensors")
    torch.testing.assert_close(run(ours), want, rtol=1e-5, atol=1e-5)
    save_lora(tmp_path / "ours.safetensors", ours)
    back = copy.deepcopy(base)
    lycoris.create_lycoris_from_weights(1.0, str(tmp_path / "ours.safetensors"), back)[0].apply_to()
    torch.testing.assert_close(run(back), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "key, shape, algorithm",
    [
        ("lycoris_transformer_blocks_0_attn_to_q.hada_w1_a", (32, 4), "LoHa"),
        ("lycoris_transformer_blocks_0_attn_to_q.lokr_t2", (4, 4, 3, 3), "Tucker"),
        ("lycoris_transformer_blocks_0_attn_to_q.oft_blocks", (4, 8, 8), "OFT"),
        ("lycoris_transformer_blocks_0_attn_to_q.dora_scale", (32, 1), "DoRA"),
        ("transformer_blocks.0.attn.to_q.lora_down.weight", (4, 32, 3, 3), "convolution"),
    ],
)
def test_unsupported_algorithms_are_refused_by_name(tmp_path, key, shape, algorithm):
    _, model = trained_toy()
    safetensors.torch.save_file({key: torch.zeros(shape)}, tmp_path / "other.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"other\.safetensors: {re.escape(key)}: .*{algorithm}"):
        load_lora(model, tmp_path / "other.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# SimpleTuner's simpletuner/examples/longcat-image-edit.lycoris-lokr/lycoris_config.json
SIMPLETUNER_LOKR = {
    "bypass_mode": True,
    "algo": "lokr",
    "multiplier": 1.0,
    "full_matrix": True,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 16,
    "apply_preset": {
        "target_module": ["LongCatImageTransformer2DModel"],
        "module_algo_map": {"LongCatImageTransformer2DModel": {"factor": 16}},
    },
}


def test_simpletuner_lycoris_config_gives_lycoris_settings():
    settings, warnings = parse_lycoris_config(SIMPLETUNER_LOKR)
    assert (settings.linear_dim, settings.linear_alpha, settings.factor, settings.full_matrix) == (
        10000,
        1.0,
        16,
        True,
    )
    assert len(warnings) == 1 and "bypass_mode" in warnings[0]
    # the transformer class means every Linear of diffusers' model, nothing else
    model = tiny_longcat()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(inject_lokr(model, settings)) == linears and len(linears) == 26
    # on the released width, factor 16: w1 (16, 16) and a whole w2 (192, 192), scale 1, alpha unused
    for dim, full_matrix, split in ((10000, False, False), (4, True, False), (4, False, True)):
        layer = nn.Sequential(nn.Linear(3072, 3072, device="meta"))
        inject_lokr(layer, lokr(linear_dim=dim, full_matrix=full_matrix, factor=16, targets=("0",)))
        assert layer[0].lokr_w1.shape == (16, 16)
        assert hasattr(layer[0], "lokr_w2_b") == split and layer[0].scale == (3 / 4 if split else 1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"algo": "loha"}, "algo = 'loha'"),
        ({"algo": "locon"}, "algo = 'locon'"),
        ({"multiplier": 0.5}, "multiplier = 0.5"),
        ({"decompose_both": True}, "decompose_both = True"),
        ({"use_scalar": True}, "use_scalar = True"),
        ({"dora_wd": "true"}, "dora_wd = True"),
        ({"full_matrix": 0}, "full_matrix = 0: write true or false"),
        ({"linear_alpha": 0.5}, "linear_alpha = 0.5"),
        ({"linear_dims": 4}, "linear_dims .*did you mean 'linear_dim'"),
        (
            {"apply_preset": {"target_module": ["LongCatImageTransformerBlock"]}},
            "class 'LongCatImageTransformerBlock'",
        ),
        (
            {"apply_preset": {"target_module": ["FeedForward"], "target_name": ["ff"]}},
            "apply_preset.target_name",
        ),
        (
            {"apply_preset": {"module_algo_map": {"FeedForward": {"algo": "loha"}}}},
            "module_algo_map.FeedForward.algo = 'loha'",
        ),
        (
            {"apply_preset": {"module_algo_map": {"FeedForward": {"factor": 4}}}},
            "different settings",
        ),
    ],
)
def test_lycoris_config_refuses_what_it_cannot_reproduce(change, message):
    with pytest.raises(ValueError, match=message):
        parse_lycoris_config({**SIMPLETUNER_LOKR, **change})


def test_lycoris_config_maps_classes_and_reports_ignored_keys():
    config = {
        "algo": "lokr",
        "multiplier": 1,
        "linear_dim": 8,
        "linear_alpha": 4,
        "conv_dim": 4,
        "apply_preset": {"target_module": ["LongCatImageAttention", "FeedForward"]},
    }
    settings, warnings = parse_lycoris_config(config)
    assert settings.targets == DEFAULT_TARGETS and settings.factor == -1
    assert not settings.full_matrix and (settings.linear_dim, settings.linear_alpha) == (8, 4.0)
    assert [w.split(" is ignored")[0] for w in warnings] == ["lycoris_config: conv_dim"]
    del config["apply_preset"]  # LyCORIS's default target list starts with Linear: every one
    assert parse_lycoris_config(config)[0].targets == LINEAR_TARGETS
