"""Block offload (model.BlockOffload) with every base precision, gradient checkpointing,
keep-attention and compile: the same loss and LoRA gradients as the model without offload, and the
blocks copied in the order they run, forward and backward. CPU; the compile cases take a minute.

Run: python -m pytest tests/test_offload.py
"""

import pytest
import torch

import lora
import model as M
import quant

TINY = M.TransformerConfig(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)
OFFLOADED = 3  # of 4 blocks: the last joint block hands over to the first single one


def build(
    precision: str,
    offload: int,
    checkpointing: bool,
    keep_attention: bool,
    compile: bool = False,
) -> M.LongCatTransformer:
    """The tiny model as train.py builds it: base quantized, LoRA (B != 0) injected, blocks
    offloaded, then moved to the device (here the CPU) and compiled."""
    torch.manual_seed(0)
    model = M.LongCatTransformer(TINY)
    quant.quantize_model(model, precision)
    lora.inject_lora(model, rank=4, alpha=4)
    with torch.no_grad():  # B != 0, so the LoRA gradients reach through every block
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora.mark_only_lora_as_trainable(model)
    model.gradient_checkpointing = checkpointing
    model.checkpoint_keep_attention = keep_attention
    if offload:
        model.offload_blocks(offload, "cpu")
    model.to("cpu")
    if compile:
        model.compile_blocks()
    return model


def inputs(L: int = 5, h: int = 3, w: int = 4) -> tuple:
    """Target + reference tokens, text, sigma, ids."""
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 2 * h * w, 64, generator=g)
    txt = torch.randn(1, L, TINY.joint_attention_dim, generator=g)
    ids = torch.cat([M.image_ids(h, w, L, 1), M.image_ids(h, w, L, 2)])
    return img, txt, torch.tensor([0.4]), ids, M.text_ids(L)


def step(model: M.LongCatTransformer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward: the loss and every LoRA gradient."""
    for p in model.parameters():
        p.grad = None
    loss = model(*inputs()).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) == 2 * (2 * 12 + 2 * 3), sorted(a)  # A, B of 30 targets
    return max((a[k] - b[k]).abs().max().item() for k in a)


CHECKPOINTING = {
    "no checkpointing": (False, False),
    "checkpointing": (True, False),
    "keep attention": (True, True),
}


@pytest.mark.parametrize("checkpointing", CHECKPOINTING)
@pytest.mark.parametrize("precision", ["none", "int8", "fp8"])
def test_offload_gives_bit_identical_loss_and_lora_grads(precision, checkpointing):
    """On a CPU "device" the copies are plain copies, so nothing may change by a single bit."""
    ckpt, keep = CHECKPOINTING[checkpointing]
    loss, grads = step(build(precision, 0, ckpt, keep))
    offloaded = build(precision, OFFLOADED, ckpt, keep)
    loss_off, grads_off = step(offloaded)
    assert torch.equal(loss_off, loss), (loss_off - loss).abs().item()
    assert max_diff(grads_off, grads) == 0, max_diff(grads_off, grads)
    # a second step gives the same again: nothing left over from the first one's fetches
    again_loss, again_grads = step(offloaded)
    assert torch.equal(again_loss, loss) and max_diff(again_grads, grads) == 0


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_an_offloaded_8bit_base_moves_with_to(precision):
    """train.py offloads on the CPU, then moves the model: idle 8-bit layers have no weight."""
    model = build(precision, OFFLOADED, True, False)
    model.to(torch.float32)
    layer = model.transformer_blocks[0].attn.to_q.base
    assert isinstance(layer, quant.QuantLinear) and layer.weight is None
    resident = model.single_transformer_blocks[1].attn.to_q.base
    assert resident.weight.dtype == quant.QDTYPE[precision], resident.weight.dtype


@pytest.mark.parametrize("n", [5, 0, -1])
def test_an_offload_count_outside_the_blocks_is_a_value_error(n):
    model = M.LongCatTransformer(TINY)
    with pytest.raises(
        ValueError, match=rf"^offload_blocks = {n}: choose 1 to 4, the model's number of blocks$"
    ):
        model.offload_blocks(n, "cpu")


def record(offload: M.BlockOffload) -> dict[str, list]:
    """Log each copy the offload starts ("copies") and each fetch that found no copy under way and
    had to wait for one ("waited"), and the most blocks on the device at once (installed + under
    way)."""
    log = {"copies": [], "waited": [], "most_on_device": [0]}
    start, fetch = offload._start, offload.fetch

    def logged_start(i):
        if i in offload.host and i not in offload.pending and i != offload.installed:
            log["copies"].append(i)
        start(i)

    def logged_fetch(i, ahead):
        if i in offload.host and i != offload.installed and i not in offload.pending:
            log["waited"].append(i)
        fetch(i, ahead)
        on_device = len(offload.pending) + (offload.installed is not None)
        log["most_on_device"][0] = max(log["most_on_device"][0], on_device)

    offload._start, offload.fetch = logged_start, logged_fetch  # fetch() and the hooks call these
    return log


@pytest.mark.parametrize("keep_attention", [False, True])
def test_training_prefetches_the_next_block_forward_and_the_previous_one_backward(keep_attention):
    """Forward: block i runs while i + 1 is copied. Backward: block 3's gradient starts block 2's
    copy, and each recomputed block i starts i - 1's. Only the very first block is waited for."""
    model = build("int8", OFFLOADED, True, keep_attention)
    log = record(model.offload)
    step(model)
    assert log["copies"] == [0, 1, 2, 2, 1, 0], log
    assert log["waited"] == [0], log
    assert log["most_on_device"] == [2], log
    held = [i for i in model.offload.host if model.offload.installed == i]
    assert held == [0], f"after the step only block 0, recomputed last, holds its weights: {held}"
    step(model)  # the next step starts with block 0 in place: it copies only what it prefetches
    assert log["copies"] == [0, 1, 2, 2, 1, 0] + [1, 2, 2, 1, 0], log
    assert log["waited"] == [0], log


def test_every_inference_pass_prefetches_block_1():
    """Inference runs forward only: each pass (a sampler step, each CFG branch) starts at block 0,
    waits for it, and has block 1 copied while block 0 computes."""
    model = build("int8", OFFLOADED, True, False)
    log = record(model.offload)
    with torch.no_grad():
        first = model(*inputs())
        second = model(*inputs())
    assert torch.equal(first, second)
    assert log["copies"] == [0, 1, 2, 0, 1, 2], log
    assert log["waited"] == [0, 0], log
    assert model.offload.installed is None and not model.offload.pending


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_offloaded_blocks_give_the_eager_numbers_and_compile_once():
    """compile + offload (int8 base, keep-attention checkpointing: the most that meets in one
    block): the fetches stay outside the compiled block, so its graphs are built by the first
    training step and the first inference pass and reused after them (traced hooks recompiled on
    nearly every call). float32 on the CPU, so the tolerance is tight. About a minute, nearly all of
    it compiling."""
    torch._dynamo.reset()
    loss, grads = step(build("int8", 0, True, True))
    model = build("int8", OFFLOADED, True, True, compile=True)
    loss_c, grads_c = step(model)
    assert torch.allclose(loss_c, loss, rtol=1e-6, atol=0), (loss_c - loss).abs().item()
    assert max_diff(grads_c, grads) < 1e-8, max_diff(grads_c, grads)
    after_training = compiled_graphs()
    again_loss, again_grads = step(model)
    assert compiled_graphs() == after_training, (after_training, compiled_graphs())
    assert torch.equal(again_loss, loss_c) and max_diff(again_grads, grads_c) == 0
    with torch.no_grad():
        model(*inputs())
        after_inference = compiled_graphs()
        model(*inputs())
    step(model)
    counts = (after_training, after_inference, compiled_graphs())
    assert compiled_graphs() == after_inference, counts
