"""A mutation check of the training recipe, its guards and the web server's stop, like mutmut's.

Each mutant is one seeded fault: a piece of one line of a file (found there exactly once) and what
it becomes. The repository's files (tracked, and untracked but not ignored) are copied into a
scratch folder; there each mutant in turn is applied, the tests named for it run (pytest -x, with a
timeout) and the file is put back. A mutant is *killed* when a test fails, *survived* when they all
pass (a fault no test notices), *timeout* when they run past the limit (counted as killed), *stale*
when its original text is not in the file or is there more than once (the code moved: update the
list). The real tree is never written to.

    python tests/mutants.py                  # every mutant (slow: up to minutes each on a CPU)
    python tests/mutants.py --list           # numbered: file:line, original -> mutated, tests
    python tests/mutants.py --only 1,4,17    # some of them
    python tests/mutants.py --timeout 600    # seconds per mutant (default 1200)
    python tests/mutants.py --baseline       # first the selected mutants' tests on unchanged code

It prints a table (mutant, result, seconds) and exits with 1 when a mutant survived or is stale. Not
collected by pytest (no test_ prefix), and too slow for CI.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPE = "tests/test_recipe.py"
FLOW = f"{RECIPE}::test_flow_loss_equals_the_official_recipe_on_diffusers"
BATCH = f"{RECIPE}::test_batch_loss_equals_the_official_recipe_on_what_it_drew"
SIGMA = (
    f"{RECIPE}::test_sigma_is_logit_normal_shifted_by_the_schedulers_mu_at_the_target_token_count"
)
SIGMA_OPTIONS = f"{RECIPE}::test_sigma_with_a_static_shift_or_uniform"
SHIFT = f"{RECIPE}::test_the_shift_is_the_schedulers_line_through_its_two_anchors"
GUARDS = "tests/test_guards.py"
DAMAGED = f"{GUARDS}::test_a_checkpoint_damaged_with_its_size_kept_fails_verification"
SKIPPED = (
    f"{GUARDS}::test_a_same_size_corruption_of_the_newest_checkpoint_resumes_from_the_one_before"
)
ROTATION = f"{GUARDS}::test_checkpoints_beyond_the_limit_rotate_out_oldest_first"
INF_GRAD = f"{GUARDS}::test_an_infinite_gradient_with_a_finite_loss_is_never_applied"
CLIPPING = f"{GUARDS}::test_the_applied_gradient_is_clipped_to_max_grad_norm"
DROPOUT = f"{GUARDS}::test_caption_dropout_drops_as_often_as_configured_and_keeps_the_reference"
RNG = f"{GUARDS}::test_a_resume_with_lora_dropout_is_exact_and_depends_on_the_restored_rng"
WARMUP = f"{GUARDS}::test_warmup_starts_at_lr_over_warmup_steps_and_reaches_lr_on_its_last_step"
LR = f"{GUARDS}::test_lr_factor_warmup_and_decay_end_values"
STOP = (
    "tests/test_serve.py::test_closing_the_server_cancels_the_edit_and_joins_every_request_thread"
)
OUTPUT = "tests/test_output.py"
NO_BATCH = "tests/test_data.py::test_images_in_a_bucket_that_fills_no_batch_are_named"
PAST_END = f"{OUTPUT}::test_a_checkpoint_past_max_train_steps_is_not_handed_back"
TORN = f"{OUTPUT}::test_a_loss_line_cut_short_is_dropped_before_the_run_goes_on"
UNLISTED = f"{OUTPUT}::test_a_checkpoint_whose_manifest_lacks_a_file_is_not_resumed"
SHARE = f"{OUTPUT}::test_a_run_killed_before_sharing_its_last_checkpoint_shares_it_when_run_again"
RESTART = f"{OUTPUT}::test_starting_over_keeps_the_earlier_runs_grids_log_and_checkpoints"
INSIDE = (
    f"{OUTPUT}::test_an_output_dir_that_would_overwrite_the_config_or_sit_in_the_model_is_refused"
)
LEFTOVERS = f"{OUTPUT}::test_leftovers_of_killed_runs_are_removed_and_nothing_else"
PREFETCH = (
    "tests/test_offload.py::"
    "test_training_prefetches_the_next_block_forward_and_the_previous_one_backward"
)


@dataclass
class Mutant:
    file: str
    original: str  # part of one line, found exactly once in the file
    mutated: str
    tests: tuple[str, ...]
    what: str  # the fault, in words


MUTANTS = [
    # noising, target, loss (train.flow_loss)
    Mutant(
        "train.py",
        "noisy = (1 - s) * x0 + s * noise",
        "noisy = s * x0 + (1 - s) * noise",
        (FLOW,),
        "noising mixes s x0 + (1 - s) eps",
    ),
    Mutant(
        "train.py",
        "target = M.pack(noise - x0)",
        "target = M.pack(x0 - noise)",
        (FLOW,),
        "target sign flipped",
    ),
    Mutant(
        "train.py",
        "s = sigma[:, None, None, None]",
        "s = sigma.mean()",
        (FLOW,),
        "one σ for the whole batch",
    ),
    Mutant(
        "train.py",
        "F.mse_loss(pred[:, : target.shape[1]].float(), target.float())",
        "(pred[:, : target.shape[1]].float() - target.float()).square().mean((1, 2)).sum()",
        (FLOW,),
        "loss summed over the batch instead of averaged",
    ),
    Mutant(
        "train.py",
        "F.mse_loss(pred[:, : target.shape[1]].float(), target.float())",
        "F.mse_loss(pred[:, -target.shape[1] :].float(), target.float())",
        (FLOW,),
        "loss on the last N tokens (the reference) instead of the target",
    ),
    Mutant(
        "train.py",
        "sigma.to(dtype), img_ids, txt_ids)",
        "(sigma * 1000).to(dtype), ids,",
        (FLOW,),
        "timestep given as σ·1000 (scaled twice)",
    ),
    Mutant(
        "model.py",
        "timestep_embedder(sigma.to(img.dtype) * 1000, img.dtype)",
        "timestep_embedder(sigma.to(img.dtype), img.dtype)",
        (FLOW,),
        "timestep embedded as σ, not σ·1000",
    ),
    # packing, modality ids, position offsets
    Mutant(
        "model.py",
        "ids.append(image_ids(h // 2, w // 2, text_len, 2 + k, device))",
        "ids.append(image_ids(h // 2, w // 2, text_len, 1 + k, device))",
        (FLOW,),
        "reference modality id 1 instead of 2",
    ),
    Mutant(
        "model.py",
        "ids = [image_ids(h // 2, w // 2, text_len, 1, device)]",
        "ids = [image_ids(h // 2, w // 2, text_len, 0, device)]",
        (FLOW,),
        "target modality id 0 instead of 1",
    ),
    Mutant(
        "model.py",
        "ids.append(image_ids(h // 2, w // 2, text_len, 2 + k, device))",
        "ids.append(image_ids(h // 2, w // 2, text_len + h // 2, 2 + k, device))",
        (FLOW,),
        "reference grid starts after the target's rows instead of at (L, L)",
    ),
    Mutant(
        "model.py",
        "tokens.append(pack(ref.to(noisy.dtype)))",
        "tokens.insert(0, pack(ref.to(noisy.dtype)))",
        (FLOW,),
        "reference tokens placed before the target tokens",
    ),
    Mutant(
        "model.py",
        "r + text_len, c + text_len], dim=-1)",
        "c + text_len, r + text_len], dim=-1)",
        (FLOW,),
        "image ids (col, row) instead of (row, col)",
    ),
    Mutant(
        "model.py",
        "torch.stack([torch.zeros_like(i), i, i], dim=-1)",
        "torch.stack([torch.zeros_like(i), i, torch.zeros_like(i)], dim=-1)",
        (FLOW,),
        "text ids (0, i, 0) instead of (0, i, i)",
    ),
    Mutant(
        "model.py",
        ".permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)",
        ".permute(0, 2, 4, 1, 5, 3)  # (B, h/2, w/2, C, 2, 2)",
        (FLOW,),
        "pack's 2x2 patch order transposed",
    ),
    # σ sampling and shift (train.sample_sigmas, batch_loss, model's shift)
    Mutant(
        "train.py",
        "torch.rand(n, generator=g) if uniform else",
        "torch.rand(n, generator=g) if not uniform else",
        (SIGMA,),
        "uniform σ by default, logit-normal when uniform is asked",
    ),
    Mutant(
        "train.py",
        "return M.time_shift(M.shift_mu(tokens, sched), sigma)",
        "return M.time_shift(-M.shift_mu(tokens, sched), sigma)",
        (SHIFT, SIGMA),
        "shift toward less noise (mu negated)",
    ),
    Mutant(
        "train.py",
        "return M.static_shift(shift, sigma) if shift > 0 else sigma",
        "return sigma",
        (SIGMA_OPTIONS,),
        "static flow_schedule_shift ignored",
    ),
    Mutant(
        "train.py",
        "tokens = (x0.shape[2] // 2) * (x0.shape[3] // 2)",
        "tokens = x0.shape[2] * x0.shape[3]",
        (SIGMA,),
        "mu from latent pixels, not target tokens",
    ),
    Mutant(
        "model.py",
        "return seq_len * m + (y0 - m * x0)",
        "return seq_len * m + y0",
        (SHIFT, SIGMA),
        "mu's line misses its intercept",
    ),
    Mutant(
        "model.py",
        "return e / (e + (1 / sigma - 1))",
        "return 1 / (1 + e * (1 / sigma - 1))",
        (SHIFT, SIGMA),
        "time shift inverted",
    ),
    Mutant(
        "model.py",
        "return s * sigma / (1 + (s - 1) * sigma)",
        "return sigma / (s - (s - 1) * sigma)",
        (SIGMA_OPTIONS,),
        "static shift inverted",
    ),
    Mutant(
        "train.py",
        "noise[i] = torch.randn(x0.shape[1:], generator=g)",
        "noise[i] = torch.rand(x0.shape[1:], generator=g)",
        (SIGMA,),
        "noise uniform instead of normal",
    ),
    Mutant(
        "train.py",
        'g = sample_generator(cfg.seed, step, batch["first"] + rows.start + i)',
        'g = sample_generator(cfg.seed, step, batch["first"] + rows.start)',
        (SIGMA,),
        "every sample of a batch draws the same σ and noise",
    ),
    # caption dropout
    Mutant(
        "train.py",
        "[0] < cfg.caption_dropout_probability",
        "[0] >= cfg.caption_dropout_probability",
        (DROPOUT,),
        "caption dropout inverted (p = 0.1 drops 90 %)",
    ),
    Mutant(
        "train.py",
        'batch["text_empty"][rows], batch["text"][rows]',
        'batch["text"][rows], batch["text_empty"][rows])',
        (DROPOUT,),
        "dropout keeps the dropped caption",
    ),
    Mutant(
        "train.py",
        'ref = batch["reference"]',
        'ref = None if drop.any() else batch["reference"]',
        (DROPOUT,),
        "caption dropout also drops the reference",
    ),
    # checkpoints: checksum, rotation
    Mutant(
        "train.py",
        'if size_differs or files.file_digest(path / name) != f["sha256"]:',
        "",
        (DAMAGED, SKIPPED),
        "checkpoint checks size only",
    ),
    Mutant(
        "train.py",
        "for old in ours[: max(0, len(ours) - limit)]:",
        "for old in ours[limit:]:",
        (ROTATION,),
        "rotation removes the newest",
    ),
    # non-finite guard, clipping
    Mutant(
        "train.py",
        "if not (math.isfinite(loss) and math.isfinite(norm)):",
        "if not math.isfinite(loss):",
        (INF_GRAD,),
        "non-finite guard checks the loss only",
    ),
    Mutant(
        "train.py",
        "cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf",
        "math.inf",
        (CLIPPING,),
        "gradient never clipped",
    ),
    # RNG state
    Mutant(
        "train.py",
        'torch.set_rng_state(states["torch"])',
        'states["torch"]',
        (RNG,),
        "resume does not restore the RNG",
    ),
    Mutant(
        "train.py",
        'states = {"torch": torch.get_rng_state()}',
        'states = {"torch": torch.Generator().get_state()}',
        (RNG,),
        "checkpoint saves a fresh RNG state, not the run's",
    ),
    Mutant(
        "lora.py",
        "nn.Dropout(dropout) if dropout > 0 else nn.Identity()",
        "nn.Identity()",
        (RNG,),
        "lora_dropout ignored",
    ),
    # learning rate
    Mutant(
        "train.py",
        "return (step + 1) / cfg.lr_warmup_steps",
        "return step / cfg.lr_warmup_steps",
        (LR, WARMUP),
        "warmup starts at 0 (its last step below lr)",
    ),
    Mutant(
        "train.py",
        "if step < cfg.lr_warmup_steps:",
        "if step <= cfg.lr_warmup_steps:",
        (LR, WARMUP),
        "warmup one step too long",
    ),
    Mutant(
        "train.py",
        "t = (step - cfg.lr_warmup_steps) /",
        "t = step /",
        (LR, WARMUP),
        "decay clock ignores the warmup",
    ),
    Mutant(
        "train.py",
        '"cosine": 0.5 * (1 + math.cos(math.pi * t))',
        '"cosine": math.cos(math.pi * t / 2)',
        (LR, WARMUP),
        "cosine decay's shape wrong",
    ),
    Mutant(
        "train.py",
        'group["lr"] = lr',
        'group["lr"] = cfg.learning_rate',
        (WARMUP,),
        "the scheduled lr logged but not applied",
    ),
    # LoRA scale, quantization scale, offload prefetch
    Mutant(
        "lora.py",
        "self.scale = alpha / rank",
        "self.scale = rank / alpha",
        (FLOW,),
        "LoRA scale r / alpha",
    ),
    Mutant(
        "lora.py",
        "b) * (self.scale * self.multiplier)",
        "b) * (self.scale * self.scale * self.multiplier)",
        (FLOW,),
        "LoRA scale applied twice",
    ),
    Mutant(
        "quant.py",
        "absmax / QMAX[mode]",
        "absmax / (QMAX[mode] + 1)",
        ("tests/test_quant.py",),
        "int8/fp8 scale max|row| / 128 (or / 449)",
    ),
    Mutant(
        "quant.py",
        "block = block.round_().clamp_(-127, 127)",
        "block = block.trunc_().clamp_(-127, 127)",
        ("tests/test_quant.py",),
        "int8 codes truncated instead of rounded",
    ),
    Mutant(
        "model.py",
        "offload.fetch(i, ahead=i - 1)",
        "offload.fetch(i, ahead=i + 1)",
        (PREFETCH,),
        "offload prefetch always assumes forward",
    ),
    # the web server's stop (Ctrl-C)
    Mutant(
        "serve.py",
        "    daemon_threads = False",
        "    daemon_threads = True",
        (STOP,),
        "request threads are daemons: exit does not wait for the cancelled edit",
    ),
    Mutant(
        "serve.py",
        "connection.shutdown(socket.SHUT_RD)",
        "pass",
        (STOP,),
        "an idle keep-alive connection holds the stop for its 120 s timeout",
    ),
    Mutant(
        "serve.py",
        "        self.stopping.set()",
        "        pass",
        (STOP,),
        "stopping does not cancel the running edit",
    ),
    # where training writes (issue 18's second sweep)
    Mutant(
        "data.py",
        "need = batch_size * accumulation * world",
        "need = batch_size * world",
        (NO_BATCH,),
        "gradient accumulation left out of the batch a bucket must fill",
    ),
    Mutant(
        "train.py",
        "if cfg.num_train_epochs and steps < cfg.max_train_steps:",
        "if False:",
        (PAST_END,),
        "num_train_epochs left out of the guard against a longer checkpoint",
    ),
    Mutant(
        "train.py",
        'if (path.read_text(errors="replace") if path.exists() else "") != kept:',
        "if len(self.rows()) != step:",
        (TORN,),
        "a torn loss line kept when the row count matches the step",
    ),
    Mutant(
        "train.py",
        "if unlisted := [n for n in needed if n not in listed]:",
        "if unlisted := []:",
        (UNLISTED,),
        "a manifest trusted for what it lists only",
    ),
    Mutant(
        "train.py",
        "if rank == 0 and resume is not None and last == resume:",
        "if False:",
        (SHARE,),
        "a run with nothing left to train does not share its last checkpoint",
    ),
    Mutant(
        "train.py",
        "            path.rename(aside / path.name)",
        "            shutil.copy2(path, aside / path.name)",
        (RESTART,),
        "starting over copies the history: a failed restart leaves a second copy",
    ),
    Mutant(
        "train.py",
        "if out == ckpt or ckpt in out.parents:",
        "if False:",
        (INSIDE,),
        "an output_dir inside the model folder accepted",
    ),
    Mutant(
        "data.py",
        "if encode_latents is not None and encode_text is not None:  # the writer",
        "if False:",
        (LEFTOVERS,),
        "killed runs' temporaries left in the caches",
    ),
]


def locate(text: str, original: str) -> int | None:
    """The line number (from 1) of the only occurrence of `original`; None if absent or repeated."""
    if text.count(original) != 1:
        return None
    return text[: text.index(original)].count("\n") + 1


def copy_repo(dest: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, as they are now."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(scratch: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """(status of the run: passed | failed | timeout, seconds, the output's tail)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.time()
    try:
        proc = subprocess.run(
            cmd, cwd=scratch, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    tail = (proc.stdout + proc.stderr)[-1500:]
    if proc.returncode == 5:
        raise SystemExit(
            f"no tests collected for {tests}: a test was renamed? update tests/mutants.py"
        )
    return ("passed" if proc.returncode == 0 else "failed"), time.time() - start, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--only", default="", help="comma-separated mutant numbers (1-based)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per mutant")
    parser.add_argument("--baseline", action="store_true", help="run the tests unmutated first")
    parser.add_argument("--verbose", action="store_true", help="print the test output of survivors")
    args = parser.parse_args()
    chosen = [int(i) for i in args.only.split(",") if i.strip()] or range(1, len(MUTANTS) + 1)
    bad = [i for i in chosen if not 1 <= i <= len(MUTANTS)]
    if bad:
        parser.error(f"no mutant {bad[0]}: there are {len(MUTANTS)}")

    if args.list:
        for i in chosen:
            m = MUTANTS[i - 1]
            line = locate((ROOT / m.file).read_text(), m.original)
            where = f"{m.file}:{line}" if line else f"{m.file} (stale)"
            print(f"{i:3d}  {where:18s} {m.what}\n       - {m.original}\n       + {m.mutated}")
            print("       tests: " + " ".join(t.split("::")[-1] for t in m.tests))
        return 0

    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="minicat-mutants-") as tmp:
        scratch = Path(tmp)
        copy_repo(scratch)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for i in chosen for t in MUTANTS[i - 1].tests))
            status, seconds, tail = run_tests(scratch, tests, args.timeout)
            print(
                f"baseline ({len(tests)} test selections): {status} in {seconds:.0f} s", flush=True
            )
            if status != "passed":
                print(tail)
                return 1
        for i in chosen:
            m = MUTANTS[i - 1]
            path = scratch / m.file
            text = path.read_text()
            line = locate(text, m.original)
            if line is None:
                rows.append((i, f"{m.file}", m.what, "stale", 0.0))
                failed = True
                print(f"{i:3d} stale: {m.original!r} is not found once in {m.file}", flush=True)
                continue
            path.write_text(text.replace(m.original, m.mutated))
            try:
                status, seconds, tail = run_tests(scratch, m.tests, args.timeout)
            finally:
                path.write_text(text)
            result = {"failed": "killed", "passed": "survived", "timeout": "timeout"}[status]
            failed |= result == "survived"
            rows.append((i, f"{m.file}:{line}", m.what, result, seconds))
            print(f"{i:3d} {result:8s} {seconds:6.0f} s  {m.file}:{line}  {m.what}", flush=True)
            if result == "survived" and args.verbose:
                print(tail)

    print(f"\n{'#':>3}  {'where':18s} {'result':8s} {'s':>6}  mutant")
    for i, where, what, result, seconds in rows:
        print(f"{i:3d}  {where:18s} {result:8s} {seconds:6.0f}  {what}")
    counts = {
        r: sum(row[3] == r for row in rows) for r in ("killed", "timeout", "survived", "stale")
    }
    print(", ".join(f"{n} {r}" for r, n in counts.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
