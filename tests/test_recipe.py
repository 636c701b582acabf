"""The training step held to an independent reference (issue 22, item 1).

The reference is written here from the paper and the official recipe
(meituan-longcat/LongCat-Image train_examples/edit_lora; SPEC §3 and §6), not from minicat's code:
diffusers' LongCatImageTransformer2DModel on the same tiny random checkpoint, with peft's LoRA
carrying the same non-zero weights as ours, is fed

    x_t = (1 - σ) x0 + σ ε,  input [pack(x_t); pack(ref)],  timestep σ (times 1000 in the model),
    ids: text (0, i, i), target (1, L + r, L + c), reference (2, L + r, L + c),
    loss = mean over every element of (pred[:, :N_target] - pack(ε - x0))²,

and minicat's `train.flow_loss` / `train.batch_loss` must give the same noised input, ids, σ,
prediction, gradient with respect to the prediction (which is the target and the reduction), loss
and LoRA gradients, in float32. The σ that `batch_loss` draws is held to its distribution:
logit(σ) ~ N(mu, 1) with mu the scheduler's shift at the sample's token count (or ln s for a static
shift s; uniform without a shift).
"""

import inspect
import math

import pytest
import torch
from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)

import config
import lora
import model as M
import train

TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
RANK, ALPHA = 4, 8.0  # alpha != rank, so a wrong LoRA scale shows


# --------------------------------------------------------------------------------------------------
# The reference, written from the recipe


def pack(z: torch.Tensor) -> torch.Tensor:
    """[B, 16, h, w] -> [B, (h/2)(w/2), 64], FLUX's `b c (h 2) (w 2) -> b (h w) (c 2 2)`."""
    B, C, h, w = z.shape
    tokens = torch.empty(B, h // 2, w // 2, C, 2, 2, dtype=z.dtype)
    for dy in range(2):
        for dx in range(2):
            tokens[..., dy, dx] = z[:, :, dy::2, dx::2].permute(0, 2, 3, 1)  # (B, h/2, w/2, C)
    return tokens.reshape(B, (h // 2) * (w // 2), C * 4)


def grid_ids(modality: int, rows: int, cols: int, start: int) -> torch.Tensor:
    """(modality, start + row, start + col) per token of a rows x cols grid, row-major: [r*c, 3]."""
    ids = [[modality, start + r, start + c] for r in range(rows) for c in range(cols)]
    return torch.tensor(ids, dtype=torch.float64)


def reference_step(dmodel, x0, ref, text, sigma, noise) -> dict:
    """The official recipe on diffusers' transformer: everything the comparison looks at."""
    B, _, h, w = x0.shape
    L = text.shape[1]
    s = sigma.view(B, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    target = pack(noise - x0)  # the velocity d x_t / d σ
    tokens, img_ids = pack(x_t), grid_ids(1, h // 2, w // 2, L)
    if (
        ref is not None
    ):  # edit: the clean reference rides along with modality 2, on the same grid start
        tokens = torch.cat([tokens, pack(ref)], dim=1)
        img_ids = torch.cat([img_ids, grid_ids(2, h // 2, w // 2, L)])
    txt_ids = torch.tensor([[0, i, i] for i in range(L)], dtype=torch.float64)
    pred = dmodel(
        hidden_states=tokens,
        encoder_hidden_states=text,
        timestep=sigma,
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]
    pred.retain_grad()
    loss = (pred[:, : target.shape[1]] - target).square().mean()
    loss.backward()
    return dict(
        tokens=tokens,
        img_ids=img_ids,
        txt_ids=txt_ids,
        sigma=sigma,
        pred=pred,
        target=target,
        loss=loss,
    )


# --------------------------------------------------------------------------------------------------
# The two models with the same LoRA


def lora_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Known non-zero A and B for each targeted Linear: {"<module>.lora_A.weight": (r, in), ...}."""
    g, out = torch.Generator().manual_seed(seed), {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in TARGETS):
            out[f"{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * 0.2
            out[f"{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.2
    return out


def diffusers_model(ckpt, weights: dict):
    """diffusers' transformer with peft's LoRA (r, alpha, the official targets) set to `weights`."""
    from diffusers import LongCatImageTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    dmodel = LongCatImageTransformer2DModel.from_pretrained(ckpt, subfolder="transformer")
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0)
    dmodel = inject_adapter_in_model(cfg, dmodel)
    result = set_peft_model_state_dict(dmodel, weights)
    assert not result.unexpected_keys, result.unexpected_keys
    for name, p in dmodel.named_parameters():
        p.requires_grad = "lora_" in name
    return dmodel


def our_model(ckpt, weights: dict):
    transformer = M.load_transformer(ckpt, torch.float32)
    lora.inject_lora(transformer, RANK, ALPHA, TARGETS)
    lora.mark_only_lora_as_trainable(transformer)
    params = dict(transformer.named_parameters())
    assert {k for k in params if "lora_" in k} == set(weights), (
        "the LoRA covers other modules than peft's"
    )
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    return transformer


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A.weight": grad} with peft's adapter name taken out."""
    return {
        n.replace(".default.", "."): p.grad.clone()
        for n, p in model.named_parameters()
        if "lora_" in n and p.requires_grad
    }


class Recorder:
    """What our transformer is called with (its forward's argument order) and its output."""

    def __init__(self, transformer):
        self.calls = []
        sig = inspect.signature(transformer.forward)

        def before(module, args, kwargs):
            self.calls.append({"args": list(sig.bind(*args, **kwargs).arguments.values())})

        def after(module, args, output):
            output.retain_grad()
            self.calls[-1]["output"] = output

        transformer.register_forward_pre_hook(before, with_kwargs=True)
        transformer.register_forward_hook(after)


def inputs(seed: int, B: int = 2, h: int = 6, w: int = 8, L: int = 5, D: int = 64):
    """x0, reference, noise [B, 16, h, w] (h != w: rows and columns cannot be swapped unseen), text
    [B, L, D] and a different σ per sample."""
    g = torch.Generator().manual_seed(seed)
    x0, ref, noise = (torch.randn(B, 16, h, w, generator=g) for _ in range(3))
    return x0, ref, torch.randn(B, L, D, generator=g), torch.tensor([0.3, 0.85])[:B], noise


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-6) -> None:
    """a equals b within tol times b's largest magnitude: float32 rounding, not another formula."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel() == 0:
        return
    diff, size = (a - b).abs().max().item(), b.abs().max().item()
    assert diff <= tol * size, f"{what}: max difference {diff:.3g} (largest value {size:.3g})"


def check_step(ours: dict, theirs: dict, grads_ours: dict, grads_theirs: dict) -> None:
    """Everything our step fed the model, what the model said, and what the loss did with it."""
    img, txt, sigma, img_ids, txt_ids = ours["args"]
    n = theirs["target"].shape[1]
    close(img[:, :n], theirs["tokens"][:, :n], "the noised target tokens (1 - σ) x0 + σ ε")
    close(img[:, n:], theirs["tokens"][:, n:], "the clean reference tokens")
    close(img_ids, theirs["img_ids"], "the image position ids (modality, L + row, L + col)", 0)
    close(txt_ids, theirs["txt_ids"], "the text position ids (0, i, i)", 0)
    close(sigma, theirs["sigma"], "the timestep the model is given (σ in [0, 1])", 0)
    close(ours["output"], theirs["pred"], "the prediction (diffusers on the same input)", 1e-5)
    # dL/dpred = 2 (pred - target) / numel on the target tokens and 0 on the reference: the target
    # ε - x0, the mean over every element of the batch and the reference left out, all at once
    close(
        ours["output"].grad,
        theirs["pred"].grad,
        "the gradient of the loss with respect to the prediction",
    )
    g = ours["output"].grad[:, :n]
    target = ours["output"][:, :n] - g * g.numel() / 2
    close(target, theirs["target"], "the regression target ε - x0 (from the loss's gradient)", 1e-5)
    assert grads_ours.keys() == grads_theirs.keys()
    worst = max(
        (grads_ours[k] - grads_theirs[k]).abs().max().item() / grads_theirs[k].abs().max().item()
        for k in grads_ours
    )
    assert worst <= 1e-5, f"the LoRA gradients: worst relative difference {worst:.3g}"


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("flavour", ["edit", "t2i"])
def test_flow_loss_equals_the_official_recipe_on_diffusers(flavour, request):
    ckpt = request.getfixturevalue(f"tiny_{flavour}")
    ours_model = our_model(ckpt, lora_weights(M.load_transformer(ckpt, torch.float32), seed=7))
    theirs_model = diffusers_model(
        ckpt, lora_weights(M.load_transformer(ckpt, torch.float32), seed=7)
    )
    x0, ref, text, sigma, noise = inputs(seed=11)
    ref = ref if flavour == "edit" else None
    rec = Recorder(ours_model)
    loss = train.flow_loss(ours_model, x0, ref, text, sigma, noise)
    loss.backward()
    theirs = reference_step(theirs_model, x0, ref, text, sigma, noise)
    assert len(rec.calls) == 1, f"{len(rec.calls)} forward passes for one step"
    close(loss, theirs["loss"], "the loss (MSE on the target tokens)")
    check_step(rec.calls[0], theirs, lora_grads(ours_model), lora_grads(theirs_model))


def test_batch_loss_equals_the_official_recipe_on_what_it_drew(tiny_edit, monkeypatch):
    """batch_loss draws caption dropout, σ and noise per sample; the recipe applied to what it drew
    (the caption or the empty one, the reference always kept) gives its loss and gradients."""
    weights = lora_weights(M.load_transformer(tiny_edit, torch.float32), seed=3)
    ours_model, theirs_model = our_model(tiny_edit, weights), diffusers_model(tiny_edit, weights)
    x0, ref, text, _, _ = inputs(seed=5)
    empty = torch.randn(text.shape, generator=torch.Generator().manual_seed(9))
    batch = {
        "target": x0,
        "reference": ref,
        "text": text,
        "text_empty": empty,
        "first": 0,
        "bucket": (8, 6),
    }
    drawn, real = [], train.flow_loss

    def recording(transformer, x0_, ref_, text_, sigma_, noise_):
        drawn.append((x0_, ref_, text_, sigma_, noise_))
        return real(transformer, x0_, ref_, text_, sigma_, noise_)

    monkeypatch.setattr(train, "flow_loss", recording)
    cfg = config.Config(seed=4, caption_dropout_probability=0.5)
    sched = M.read_scheduler(tiny_edit)
    rec = Recorder(ours_model)
    loss = train.batch_loss(ours_model, batch, slice(0, 2), 0, cfg, sched, torch.device("cpu"))
    loss.backward()
    ((x0_, ref_, text_, sigma_, noise_),) = drawn
    close(x0_, x0, "x0", 0)
    close(ref_, ref, "the reference (kept whatever the caption)", 0)
    for i in range(2):
        assert torch.equal(text_[i], text[i]) or torch.equal(text_[i], empty[i]), (
            f"row {i}: whose caption?"
        )
    assert ((sigma_ > 0) & (sigma_ < 1)).all() and sigma_[0] != sigma_[1], sigma_
    theirs = reference_step(theirs_model, x0, ref, text_, sigma_, noise_)
    close(loss, theirs["loss"], "the loss")
    check_step(rec.calls[0], theirs, lora_grads(ours_model), lora_grads(theirs_model))


def drawn_sigmas(
    monkeypatch, tiny_edit, n: int, h: int, w: int, **keys
) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ [n], noise [n, 16, h, w]) as batch_loss draws them for n samples (over several steps), the
    model replaced by a recorder."""
    sigmas, noises = [], []

    def record(transformer, x0, ref, text, sigma, noise):
        sigmas.append(sigma)
        noises.append(noise)
        return torch.zeros(())

    monkeypatch.setattr(train, "flow_loss", record)
    rows = 250
    batch = {
        "target": torch.zeros(1, 16, h, w).expand(rows, -1, -1, -1),
        "reference": None,
        "text": torch.zeros(rows, 3, 8),
        "text_empty": torch.zeros(rows, 3, 8),
        "first": 0,
        "bucket": (8 * w, 8 * h),
    }
    cfg = config.Config(seed=1, caption_dropout_probability=0.0, **keys)
    sched = M.read_scheduler(tiny_edit)
    for step in range(n // rows):
        train.batch_loss(None, batch, slice(0, rows), step, cfg, sched, torch.device("cpu"))
    return torch.cat(sigmas), torch.cat(noises)


def logit(s: torch.Tensor) -> torch.Tensor:
    return torch.log(s.double() / (1 - s.double()))


def test_sigma_is_logit_normal_shifted_by_the_schedulers_mu_at_the_target_token_count(
    tiny_edit, monkeypatch
):
    """SPEC §6: σ = sigmoid(N(0, 1)), then σ' = e^mu / (e^mu + 1/σ - 1), i.e. logit(σ') =
    logit(σ) + mu, with mu linear in the target's token count (h/2)(w/2) between the scheduler's
    two anchors."""
    sched = M.read_scheduler(tiny_edit)
    h, w = 64, 64  # 1024 target tokens: mu 0.63 (4096, the latent pixels, would give 1.15)
    sigma, noise = drawn_sigmas(monkeypatch, tiny_edit, 1000, h, w)
    tokens = (h // 2) * (w // 2)
    slope = (sched["max_shift"] - sched["base_shift"]) / (
        sched["max_image_seq_len"] - sched["base_image_seq_len"]
    )
    mu = sched["base_shift"] + slope * (tokens - sched["base_image_seq_len"])
    z = logit(sigma)
    assert abs(z.mean().item() - mu) < 0.1, (
        f"logit(σ) mean {z.mean().item():.3f}, want mu = {mu:.3f}"
    )
    assert abs(z.std().item() - 1) < 0.08, f"logit(σ) std {z.std().item():.3f}, want 1"
    assert len(set(sigma.tolist())) == len(sigma), "every sample draws its own σ"
    # ε ~ N(0, 1), its own for every sample
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01, (
        noise.mean(),
        noise.std(),
    )
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[250])


def test_sigma_with_a_static_shift_or_uniform(tiny_edit, monkeypatch):
    """flow_schedule_shift = s, no auto shift: logit(σ) ~ N(ln s, 1); uniform, no shift: U(0, 1)."""
    sigma, _ = drawn_sigmas(
        monkeypatch, tiny_edit, 1000, 4, 4, flow_schedule_auto_shift=False, flow_schedule_shift=3.0
    )
    z = logit(sigma)
    assert abs(z.mean().item() - math.log(3)) < 0.1 and abs(z.std().item() - 1) < 0.08, (
        z.mean(),
        z.std(),
    )
    sigma, _ = drawn_sigmas(
        monkeypatch,
        tiny_edit,
        1000,
        4,
        4,
        flow_schedule_auto_shift=False,
        flow_use_uniform_schedule=True,
    )
    assert abs(sigma.mean().item() - 0.5) < 0.03 and abs(sigma.var().item() - 1 / 12) < 0.01, (
        sigma.var()
    )
    assert ((sigma > 0) & (sigma < 1)).all()
    counts = torch.histc(sigma, bins=4, min=0, max=1)
    assert (counts - 250).abs().max() < 60, counts  # flat: no logit-normal hump in the middle


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_the_shift_is_the_schedulers_line_through_its_two_anchors(tiny_edit, tokens):
    """200k draws at the anchors (256 -> base_shift, 4096 -> max_shift) and between: logit(σ') has
    mean mu within 0.015 (7 standard errors), fine enough to see mu's intercept off by 0.04."""
    sched = M.read_scheduler(tiny_edit)
    x0, x1 = sched["base_image_seq_len"], sched["max_image_seq_len"]
    y0, y1 = sched["base_shift"], sched["max_shift"]
    mu = y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
    z = logit(train.sample_sigmas(200_000, tokens, sched, torch.Generator().manual_seed(tokens)))
    assert abs(z.mean().item() - mu) < 0.015, (
        f"logit(σ) mean {z.mean().item():.4f}, want mu = {mu:.4f}"
    )
    assert abs(z.std().item() - 1) < 0.01, f"logit(σ) std {z.std().item():.4f}, want 1"
