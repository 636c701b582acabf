"""model.py against diffusers: the transformer, the VAE, packing, ids and schedule give diffusers'
numbers on the same random weights; the full-size modules have the released names and shapes; the
loader reads only what it has checked (names, shapes, every byte of every tensor); the attention
kernels and the speed options leave the numbers as they are."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, validate_cli
from torch.nn.attention import SDPBackend

import config
import lora
import model as M
import pipeline

DIFFUSERS_TINY = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=40,
    pooled_projection_dim=40,
    axes_dims_rope=[4, 6, 6],
)


def perturb_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move each parameter off its init (norms start at one): swapped or skipped ones show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            spread = p.std().clamp(min=0.1) if p.numel() > 1 else 1.0
            p.add_(0.2 * torch.randn(p.shape, generator=g) * spread)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_transformer_matches_diffusers(tmp_path):
    from diffusers import LongCatImageTransformer2DModel

    torch.manual_seed(0)
    theirs = perturb_(LongCatImageTransformer2DModel(**DIFFUSERS_TINY)).eval()
    theirs.save_pretrained(tmp_path / "transformer")
    ours = M.load_transformer(tmp_path, torch.float32)
    L, h, w = 7, 4, 6
    img = torch.randn(2, 2 * (h // 2) * (w // 2), 64)  # target + reference tokens
    txt = torch.randn(2, L, 40)
    sigma = torch.tensor([0.9, 0.3])
    txt_ids = M.text_ids(L)
    img_ids = torch.cat([M.image_ids(h // 2, w // 2, L, 1), M.image_ids(h // 2, w // 2, L, 2)])
    with torch.no_grad():
        want = theirs(img, txt, sigma, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        got = ours(img, txt, sigma, img_ids, txt_ids)
    assert got.shape == want.shape == img.shape
    assert rel_err(got, want) < 1e-5, f"max relative difference {rel_err(got, want):.2e}"


def tiny_inputs(L=5, h=3, w=4):
    """Inputs of the tiny transformer: target + reference tokens, text, sigma, ids."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 2 * h * w, 64, generator=g), torch.randn(1, L, 64, generator=g)
    ids = torch.cat([M.image_ids(h, w, L, 1), M.image_ids(h, w, L, 2)])
    return img, txt, torch.tensor([0.5]), ids, M.text_ids(L)


def output_and_lora_grads(model, args) -> tuple[torch.Tensor, dict]:
    for p in model.parameters():
        p.grad = None
    out = model(*args)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("keep_attention", [False, True])
def test_gradient_checkpointing_changes_nothing(tiny_edit, keep_attention):
    model = M.load_transformer(tiny_edit, torch.float32)
    lora.inject_lora(model, 4, 4)
    with torch.no_grad():  # B != 0, so the LoRA gradients reach through every block
        for p in (p for name, p in model.named_parameters() if "lora_B" in name):
            p.add_(0.1 * torch.randn_like(p))
    lora.mark_only_lora_as_trainable(model)
    plain = output_and_lora_grads(model, tiny_inputs())
    model.gradient_checkpointing = True
    model.checkpoint_keep_attention = keep_attention
    ckpt = output_and_lora_grads(model, tiny_inputs())
    assert torch.equal(plain[0], ckpt[0])
    targets = 2 * 12 + 2 * 3  # 12 in each joint block, 3 in each single one
    assert len(plain[1]) == 2 * targets, len(plain[1])  # A and B of each
    diff = max((plain[1][k] - ckpt[1][k]).abs().max().item() for k in plain[1])
    assert diff <= 1e-7, diff


def test_vae_matches_diffusers(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    cfg = dict(
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    theirs = perturb_(AutoencoderKL(**cfg)).eval()
    theirs.save_pretrained(tmp_path / "vae")
    ours = M.load_vae(tmp_path, torch.float32)
    x = torch.rand(1, 3, 48, 80) * 2 - 1
    with torch.no_grad():
        mean_want, mean_got = theirs.encode(x).latent_dist.mean, ours.encode(x)
        z = torch.randn(1, 16, 6, 10)
        img_want, img_got = theirs.decode(z).sample, ours.decode(z)
    assert rel_err(mean_got, mean_want) < 1e-5, rel_err(mean_got, mean_want)
    assert rel_err(img_got, img_want) < 1e-5, rel_err(img_got, img_want)
    assert ours.config.scaling_factor == 0.3611 and ours.config.shift_factor == 0.1159


def test_full_size_modules_have_the_released_names_and_shapes():
    from diffusers import AutoencoderKL, LongCatImageTransformer2DModel

    released = dict(
        num_layers=10,
        num_single_layers=20,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        pooled_projection_dim=3584,
        axes_dims_rope=[16, 56, 56],
    )
    with torch.device("meta"):
        theirs = {
            k: v.shape for k, v in LongCatImageTransformer2DModel(**released).state_dict().items()
        }
        ours = {k: v.shape for k, v in M.LongCatTransformer().state_dict().items()}
        vae_theirs = AutoencoderKL(
            latent_channels=16,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).state_dict()
        vae_ours = M.VAE().state_dict()
    assert ours == theirs
    assert len(ours) == 612 and sum(s.numel() for s in ours.values()) == 6_270_668_864
    assert {k: v.shape for k, v in vae_ours.items()} == {k: v.shape for k, v in vae_theirs.items()}
    assert sum(v.numel() for v in vae_ours.values()) == 83_819_683


def test_pack_is_diffusers_pack_and_unpack_inverts_it():
    from diffusers import LongCatImageEditPipeline as P

    z = torch.randn(2, 16, 6, 10)
    packed = M.pack(z)
    assert torch.equal(packed, P._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(M.unpack(packed, 6, 10), z)
    assert torch.equal(M.unpack(packed, 6, 10), P._unpack_latents(packed, 48, 80, 8))


def test_position_ids_match_diffusers():
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import prepare_pos_ids

    assert torch.equal(M.text_ids(9), prepare_pos_ids(0, "text", (0, 0), num_token=9).double())
    for modality in (1, 2):
        want = prepare_pos_ids(modality, "image", (530, 530), height=3, width=5).double()
        assert torch.equal(M.image_ids(3, 5, 530, modality), want)


@pytest.mark.parametrize("steps,seq_len", [(1, 256), (4, 900), (40, 3321), (50, 4096), (8, 6000)])
def test_schedule_matches_diffusers_scheduler(tiny_edit, steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_shift

    sched = M.read_scheduler(tiny_edit)
    s = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_edit, subfolder="scheduler")
    mu = calculate_shift(seq_len, 256, 4096, sched["base_shift"], sched["max_shift"])
    s.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    assert M.shift_mu(seq_len, sched) == mu
    assert torch.equal(M.schedule(steps, seq_len, sched), s.sigmas)


@pytest.mark.parametrize(
    "size", [(160, 96), (96, 160), (1000, 1000), (1920, 1080), (333, 777), (64, 128)]
)
def test_edit_size_is_diffusers_one_megapixel_rule(size):
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions

    assert pipeline.edit_size(*size) == calculate_dimensions(1024 * 1024, size[0] * 1.0 / size[1])


def test_loader_names_the_missing_file(tiny_edit, tmp_path):
    broken = shutil.copytree(tiny_edit, tmp_path / "ckpt")
    (broken / "vae/config.json").unlink()
    with pytest.raises(M.CheckpointError, match="vae/config.json is missing"):
        config.resolve_checkpoint(broken)
    with pytest.raises(M.CheckpointError, match="no such folder"):
        config.resolve_checkpoint(tmp_path / "nowhere")


def test_loader_names_the_first_mismatching_tensor(tiny_edit, tmp_path):
    broken = shutil.copytree(tiny_edit, tmp_path / "ckpt")
    cfg = json.loads((broken / "transformer/config.json").read_text())
    cfg["joint_attention_dim"] = 32  # the weights say 64
    (broken / "transformer/config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        M.CheckpointError,
        match=r"context_embedder.weight is of shape \[64, 64\], expected \[64, 32\]",
    ):
        M.load_transformer(broken)
    index = json.loads(
        (broken / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    shard = sorted(set(index["weight_map"].values()))[1]
    (broken / "transformer" / shard).unlink()
    with pytest.raises(M.CheckpointError, match=shard):
        M.load_transformer(broken)


def test_loading_respects_dtype_and_leaves_nothing_on_meta(tiny_edit):
    model = M.load_transformer(tiny_edit, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


def test_keep_attention_checkpointing_runs_attention_once_per_block(tiny_edit):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in M.ATTENTION_OPS
            return func(*args, **(kwargs or {}))

    model = M.load_transformer(tiny_edit, torch.float32)
    model.transformer_blocks[0].attn.to_q.weight.requires_grad_(True)
    model.gradient_checkpointing, calls = True, {}
    for keep in (False, True):
        model.checkpoint_keep_attention = keep
        with Count() as count:
            count.n = 0
            model(*tiny_inputs()).sum().backward()
        calls[keep] = count.n
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert calls == {False: 2 * blocks, True: blocks}, calls


def shard(ckpt):
    index = json.loads(
        (ckpt / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    return ckpt / "transformer" / sorted(set(index["weight_map"].values()))[0]


def test_a_truncated_shard_is_named_not_loaded(tiny_edit, tmp_path):
    broken = shutil.copytree(tiny_edit, tmp_path / "ckpt")
    path = shard(broken)
    path.write_bytes(path.read_bytes()[:-2000])  # the last tensors lose their bytes
    with pytest.raises(M.CheckpointError, match=f"{path.name}: truncated"):
        M.load_transformer(broken)
    vae = broken / "vae/diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-1])
    with pytest.raises(M.CheckpointError, match="diffusion_pytorch_model.safetensors: truncated"):
        M.load_vae(broken)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (
            lambda raw: (2**62).to_bytes(8, "little") + raw[8:],  # an absurd header length
            "not a safetensors file",
        ),
        (lambda raw: raw[:8] + b"[" + raw[9:], "corrupt safetensors header"),
        (
            lambda raw: raw.replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1),
            "corrupt header entry",
        ),
    ],
)
def test_a_corrupt_header_is_named(tiny_edit, tmp_path, corrupt, message):
    broken = shutil.copytree(tiny_edit, tmp_path / "ckpt")
    path = shard(broken)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(M.CheckpointError, match=f"{path.name}: .*{message}"):
        M.load_transformer(broken)


def test_a_short_read_is_refused(tmp_path):
    """Bytes gone after the header was checked (a file cut while read): never old buffer bytes."""
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\0" * 64)
    staging = torch.full((32,), 7, dtype=torch.uint8)
    with open(path, "rb") as fh, pytest.raises(M.CheckpointError, match="read 16 of 32 bytes"):
        M.read_tensor(fh, {"data_offsets": [48, 80], "dtype": "U8", "shape": [32]}, staging)


def test_validate_names_a_truncated_checkpoint_in_one_line(tiny_t2i, tmp_path):
    broken = shutil.copytree(tiny_t2i, tmp_path / "ckpt")
    path = shard(broken)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    proc = validate_cli(
        model=broken, prompt="x", steps=1, resolution="64x64", out=tmp_path / "o.png", check=False
    )
    assert_one_line_error(proc, path.name, "truncated")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("name", ["model_index.json", "transformer/config.json"])
def test_a_checkpoint_json_that_is_not_an_object_is_named(tiny_t2i, tmp_path, name):
    """Catches an AttributeError traceback (a list has no .get) for a damaged config file."""
    broken = shutil.copytree(tiny_t2i, tmp_path / "ckpt")
    (broken / name).write_text("[]")
    proc = validate_cli(
        model=broken, prompt="x", steps=1, resolution="64x64", out=tmp_path / "o.png", check=False
    )
    assert_one_line_error(proc, f"{broken / name}: a JSON object, not list")


def test_math_attention_agrees_with_the_default_kernel(tiny_edit):
    """The "math" backend really switches kernels (torch's fused CPU kernel is one op; the math
    path dispatches its matmuls and softmax instead), and the two agree closely."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FusedAttention(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in M.ATTENTION_OPS
            return func(*args, **(kwargs or {}))

    model, args = M.load_transformer(tiny_edit, torch.float32), tiny_inputs()
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    try:
        with torch.no_grad():
            M.set_attention_backend("auto")
            with FusedAttention() as default_kernel:
                default_kernel.n = 0
                default = model(*args)
            M.set_attention_backend("math")
            with FusedAttention() as math_kernel:
                math_kernel.n = 0
                math_out = model(*args)
            assert M.SDPA_BACKENDS[False] == [SDPBackend.MATH]
    finally:
        M.set_attention_backend("auto")
    assert (default_kernel.n, math_kernel.n) == (blocks, 0), (default_kernel.n, math_kernel.n)
    assert rel_err(math_out, default) < 1e-5, rel_err(math_out, default)


def test_auto_attention_never_allows_cudnn_where_gradients_flow():
    M.set_attention_backend("auto")
    assert SDPBackend.CUDNN_ATTENTION not in M.SDPA_BACKENDS[True] and M.SDPA_BACKENDS[True]
    assert M.SDPA_BACKENDS[False] is None  # inference: torch's own choice, cuDNN included


def test_a_program_that_never_chooses_gets_auto():
    """model.py used on its own (a copied file, a script): cuDNN's backward is off there too."""
    code = "import model; print(model.SDPA_BACKENDS == model.attention_backends('auto'))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True", out


def test_an_attention_kernel_missing_here_is_one_line_naming_the_flag_and_choices(
    tiny_t2i, tmp_path
):
    # on the CPU, also where a GPU is present: torch has no memory-efficient kernel for the CPU
    out = tmp_path / "o.png"
    proc = validate_cli(
        model=tiny_t2i, prompt="x", attention="efficient", device="cpu", out=out, check=False
    )
    choices = "auto, flash, efficient, cudnn, math"
    assert_one_line_error(proc, "--attention 'efficient': not available on cpu", choices)
    proc = validate_cli(
        model=tiny_t2i, prompt="x", attention="fast", device="cpu", out=out, check=False
    )
    assert_one_line_error(proc, "--attention 'fast'", "choose one of auto")


def test_compiled_blocks_give_the_eager_numbers(tiny_edit):
    """compile = true: regional torch.compile of each block; float32 on CPU: a tight tolerance."""
    model = M.load_transformer(tiny_edit, torch.float32)
    lora.inject_lora(model, 4, 4)
    lora.mark_only_lora_as_trainable(model)
    model.gradient_checkpointing = True
    eager = output_and_lora_grads(model, tiny_inputs())
    model.compile_blocks()
    compiled = output_and_lora_grads(model, tiny_inputs())
    assert rel_err(compiled[0], eager[0]) < 1e-5, rel_err(compiled[0], eager[0])
    for k in eager[1]:
        assert torch.allclose(compiled[1][k], eager[1][k], rtol=1e-4, atol=1e-8), (
            k,
            (compiled[1][k] - eager[1][k]).abs().max(),
        )
