"""model.py against diffusers: the transformer, the VAE, packing, ids, schedule and prompt encoding give
diffusers' numbers on the same random weights; the full-size modules have the released names and shapes."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import diffusers_pipeline
from PIL import Image

import model as M

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
    """Move every parameter off its init (norm weights are all ones) so swapped or skipped ones show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(
                0.2 * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 1.0).clamp(min=0.1)
            )
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


@pytest.mark.parametrize("mode", [True, "keep_attention"])
def test_gradient_checkpointing_changes_nothing(tiny_edit, mode):
    model = M.load_transformer(tiny_edit, torch.float32).requires_grad_(True)
    img, txt = torch.randn(1, 12, 64), torch.randn(1, 5, 64)
    args = (img, txt, torch.tensor([0.5]), M.image_ids(3, 4, 5, 1), M.text_ids(5))
    grads = []
    for ckpt in (False, mode):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        out = model(*args)
        out.square().mean().backward()
        grads.append((out.detach(), model.transformer_blocks[0].attn.to_q.weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-7), (grads[0][1] - grads[1][1]).abs().max()


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
        theirs = {k: v.shape for k, v in LongCatImageTransformer2DModel(**released).state_dict().items()}
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


@pytest.mark.parametrize("size", [(160, 96), (96, 160), (1000, 1000), (1920, 1080), (333, 777), (64, 128)])
def test_edit_size_is_diffusers_one_megapixel_rule(size):
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions

    assert M.edit_size(*size) == calculate_dimensions(1024 * 1024, size[0] * 1.0 / size[1])


PROMPTS = [
    "make the sky blue",
    "write 'Hello World' on the sign",
    'replace the text with "OPEN 24h" and don\'t touch the rest',
    "add \u201cdouble\u201d and \u2018single\u2019 curly quotes, plus 'three' spans",
    "",
    "unbalanced 'quote here",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_quote_splitting_matches_diffusers(prompt):
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import split_quotation

    assert M.split_quotes(prompt) == split_quotation(prompt)


def test_quoted_text_is_tokenised_by_character(tiny_edit):
    te = M.load_text_encoder(tiny_edit, torch.float32)
    tok = lambda s: te.tokenizer(s, add_special_tokens=False)["input_ids"]
    assert len(tok("blue")) < 4  # the tiny BPE merges this word ...
    ids = te.tokenize("make it 'blue'")
    assert ids == tok("make it ") + [i for ch in "'blue'" for i in tok(ch)]  # ... but not when quoted
    assert len(te.tokenize("word " * 600)) == M.MAX_PROMPT_TOKENS


@pytest.fixture(scope="module")
def edit_pair(tiny_edit):
    return M.load_text_encoder(tiny_edit, torch.float32), diffusers_pipeline(tiny_edit)


@pytest.mark.parametrize("prompt", PROMPTS[:4])
@pytest.mark.parametrize("size", [(320, 192), (208, 400)])
def test_edit_prompt_embeddings_match_diffusers(edit_pair, prompt, size):
    te, pipe = edit_pair
    rng = np.random.default_rng(size[0])
    ref = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    half = ref.resize((size[0] // 2, size[1] // 2), Image.LANCZOS)  # what the pipeline hands Qwen
    want, _ = pipe.encode_prompt(prompt=prompt, image=half)
    got = te.encode(prompt, ref)
    assert got.shape == want.shape, (got.shape, want.shape)
    n_vl = round(size[0] / 2 / 28) * round(
        size[1] / 2 / 28
    )  # smart_resize to multiples of 28, then 2x2 merge
    assert got.shape[1] == 514 + n_vl
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()


def test_t2i_prompt_embeddings_match_diffusers(tiny_t2i):
    te, pipe = M.load_text_encoder(tiny_t2i, torch.float32), diffusers_pipeline(tiny_t2i)
    for prompt in PROMPTS:
        want, _ = pipe.encode_prompt(prompt=prompt)
        got = te.encode(prompt)
        assert got.shape == (1, 512, 64)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (prompt, (got - want).abs().max())


def test_loader_names_the_missing_file(tiny_edit, tmp_path):
    broken = shutil.copytree(tiny_edit, tmp_path / "ckpt")
    (broken / "vae/config.json").unlink()
    with pytest.raises(M.CheckpointError, match="vae/config.json is missing"):
        M.resolve_checkpoint(broken)
    with pytest.raises(M.CheckpointError, match="no such folder"):
        M.resolve_checkpoint(tmp_path / "nowhere")


def test_loader_names_the_first_mismatching_tensor(tiny_edit, tmp_path):
    broken = shutil.copytree(tiny_edit, tmp_path / "ckpt")
    cfg = json.loads((broken / "transformer/config.json").read_text())
    cfg["joint_attention_dim"] = 32  # the weights say 64
    (broken / "transformer/config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        M.CheckpointError, match=r"context_embedder.weight has shape \[64, 64\], expected \[64, 32\]"
    ):
        M.load_transformer(broken)
    index = json.loads((broken / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
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
    args = (
        torch.randn(1, 12, 64),
        torch.randn(1, 5, 64),
        torch.tensor([0.5]),
        M.image_ids(3, 4, 5, 1),
        M.text_ids(5),
    )
    calls = {}
    for mode in (True, "keep_attention"):
        model.gradient_checkpointing = mode
        with Count() as count:
            count.n = 0
            model(*args).sum().backward()
        calls[mode] = count.n
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert calls == {True: 2 * blocks, "keep_attention": blocks}, calls
