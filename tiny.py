"""A tiny random LongCat checkpoint in the released folder layout: the demo (`python train.py
examples/tiny.toml`, `--model tiny`) and the tests run the real loading code on it without 30 GB of
weights.

It has everything the released checkpoints have, at toy sizes: model_index.json naming the pipeline,
transformer/ (config + two safetensors shards + index json), vae/, text_encoder/ (a real Qwen2.5-VL
with 2 layers), tokenizer/ and text_processor/ (a 400-token byte-level BPE trained on the prompt
templates, with Qwen's special tokens; the image processor config), scheduler/. Deterministic for a
seed. diffusers loads the same folder, which is how the tests hold our numbers to its pipelines.
"""

import json
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

import model as M
import pipeline

TRANSFORMER = M.TransformerConfig(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    axes_dims_rope=(8, 12, 12),
)
VAE = M.VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
QWEN_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
QWEN_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The released checkpoints' scheduler/scheduler_config.json and text_processor settings.
SCHEDULER = dict(
    _class_name="FlowMatchEulerDiscreteScheduler",
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
IMAGE_PROCESSOR = dict(
    image_processor_type="Qwen2VLImageProcessor",
    patch_size=14,
    merge_size=2,
    temporal_patch_size=2,
    min_pixels=3136,
    max_pixels=12845056,
    resample=3,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    do_convert_rgb=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)
COMPONENTS = dict(
    scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
    text_encoder=["transformers", "Qwen2_5_VLForConditionalGeneration"],
    tokenizer=["transformers", "Qwen2Tokenizer"],
    text_processor=["transformers", "Qwen2VLProcessor"],
    transformer=["diffusers", "LongCatImageTransformer2DModel"],
    vae=["diffusers", "AutoencoderKL"],
)
PIPELINES = {"edit": "LongCatImageEditPipeline", "t2i": "LongCatImagePipeline"}
VERSION = 2  # in the cached folder's name: bump when what write() produces changes


def tokenizer():
    """A byte-level BPE like Qwen2's (400 tokens) trained on the templates: words merge, quotes
    don't."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    corpus = [
        pipeline.T2I_PREFIX,
        pipeline.EDIT_PREFIX,
        pipeline.SUFFIX,
        "make the sky blue, add a red hat",
    ]
    tok.train_from_iterator(corpus * 3, trainer)
    return Qwen2Tokenizer(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token=None
    )


def save_component(folder: Path, state: dict, config: dict, shards: int = 1) -> None:
    """config.json + diffusion_pytorch_model*.safetensors, sharded with an index json as
    diffusers does."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if shards == 1:
        return save_file(
            state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"}
        )
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(index, indent=2)
    )


def write(folder: str | Path, flavour: str = "edit", seed: int = 0) -> Path:
    """Write a random tiny checkpoint of `flavour` ("edit" or "t2i") into folder; returns the folder."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    # transformers' chatter about this made-up config (token ids outside the 400-token vocabulary,
    # rope keys, shard bars) is not the user's business
    with (
        pipeline.quiet_transformers(),
        warnings.catch_warnings(),
        torch.random.fork_rng(devices=[]),
    ):
        warnings.simplefilter("ignore", FutureWarning)  # rope_scaling's deprecation
        torch.manual_seed(seed)
        tok = tokenizer()
        tid = tok.convert_tokens_to_ids
        text = {**QWEN_TEXT, "vocab_size": len(tok)}
        qwen = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=QWEN_VISION,
            image_token_id=tid("<|image_pad|>"),
            video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"),
            vision_end_token_id=tid("<|vision_end|>"),
            bos_token_id=tid("<|endoftext|>"),
            eos_token_id=tid("<|im_end|>"),
            **text,
        )
        Qwen2_5_VLForConditionalGeneration(qwen).save_pretrained(folder / "text_encoder")
        transformer = M.LongCatTransformer(TRANSFORMER)
        vae = M.VAE(VAE)
    for sub in ("tokenizer", "text_processor"):
        tok.save_pretrained(folder / sub)
        (folder / sub / "preprocessor_config.json").write_text(
            json.dumps(IMAGE_PROCESSOR, indent=2)
        )
    index = {"_class_name": PIPELINES[flavour], "_diffusers_version": "0.36.0", **COMPONENTS}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    blocks = {
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    save_component(
        folder / "vae", vae.state_dict(), {"_class_name": "AutoencoderKL", **asdict(VAE), **blocks}
    )
    config = {"_class_name": "LongCatImageTransformer2DModel", **asdict(TRANSFORMER)}
    save_component(folder / "transformer", transformer.state_dict(), config, shards=2)
    return folder


def checkpoint(flavour: str = "edit") -> Path:
    """The cached tiny checkpoint of a flavour (~/.cache/minicat, or $XDG_CACHE_HOME), written on
    first use. Written aside and renamed, so processes racing here (torchrun ranks) never see half a
    folder."""
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "minicat"
        / f"tiny-{flavour}-v{VERSION}"
    )
    if not cache.exists():
        tmp = write(cache.with_name(f"{cache.name}.tmp-{os.getpid()}"), flavour)
        try:
            tmp.rename(cache)
        except OSError:  # another process got there first
            shutil.rmtree(tmp)
    return cache
