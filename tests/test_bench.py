"""bench.py: `--released --small` measures every configuration and writes every number; a first loss
off diffusers' stops the run; the released model's memory plan is sane (fake tensors: no 6B
weights)."""

import json
import math
from argparse import Namespace

import pytest
import torch
from conftest import run_script

import bench

# every training / inference measurement --released writes, by name (a rename must show up here)
BASES = ["minicat_bf16", "minicat_int8", "minicat_fp8", "minicat_fp8_compute"]
INFER_KEYS = {"diffusers_bf16", *BASES, "minicat_int8_offload"}
TRAIN_KEYS = INFER_KEYS | {f"{b}_keep_attention" for b in BASES}
TRAIN_FIELDS = ("first_loss", "step_s", "peak_gb", "tflops", "mfu", "step_s_ratio", "peak_gb_ratio")
INFER_FIELDS = (
    "forward_s",
    "peak_gb",
    "tflops",
    "mfu",
    "forward_s_ratio",
    "peak_gb_ratio",
    "max_abs_diff",
)


def positive(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[dict, str]:
    """`python bench.py --released --small --json F` (~1.5 min on 2 CPU cores): (the JSON, stdout)."""
    path = tmp_path_factory.mktemp("bench") / "small.json"
    proc = run_script(
        "bench.py", "--released", "--small", "--warmup", 0, "--steps", 1, "--json", path
    )
    return json.loads(path.read_text()), proc.stdout


def test_mfu_uses_the_named_gpus_peak_and_says_where_it_comes_from():
    assert bench.peak_flops("NVIDIA H200") == (989.0, "H200, dense bf16")
    # "H100 PCIe" is looked up before "H100": the longer name wins
    assert bench.peak_flops("NVIDIA H100 PCIe") == (756.0, "H100 PCIe, dense bf16")
    assert bench.peak_flops("NVIDIA B200")[0] == 2250.0
    peak, why = bench.peak_flops("Some Future GPU")
    assert peak == 989.0 and "--peak-tflops" in why, why
    assert bench.peak_flops("NVIDIA H200", 500.0) == (500.0, "--peak-tflops")


def test_released_small_writes_every_measurement(small):
    rel, stdout = small[0]["released"], small[1]
    assert rel["failed"] == {}, rel["failed"]
    # only fp8-compute may be skipped (no fp8 support), and only with its reason
    assert set(rel["skipped"]) <= {"minicat_fp8_compute"} and all(rel["skipped"].values()), rel[
        "skipped"
    ]
    assert rel["model"]["num_attention_heads"] * rel["model"]["attention_head_dim"] == 256
    assert rel["offload_blocks"] == 2 and positive(rel["peak_tflops"]) and rel["peak_tflops_source"]
    ((res, r),) = rel["res"].items()
    assert res == "256" and r["tokens"] == {
        "target": 256,
        "reference": 256,
        "text": 539,
        "total": 1051,
    }, r
    assert positive(r["model_tflop"]["train"]) and positive(r["model_tflop"]["infer"])
    assert set(r["train"]) == TRAIN_KEYS and set(r["infer"]) == INFER_KEYS, (r["train"], r["infer"])
    for kind, fields in (("train", TRAIN_FIELDS), ("infer", INFER_FIELDS)):
        for key, entry in r[kind].items():
            if entry is None:
                assert key.removesuffix("_keep_attention") in rel["skipped"], (kind, key)
                continue
            # diffusers' own difference is 0; every other number is positive and finite
            bad = [
                f
                for f in fields
                if not positive(entry[f]) and not (f == "max_abs_diff" and entry[f] == 0)
            ]
            assert not bad, (kind, key, entry)
    train, infer = r["train"], r["infer"]
    assert (
        train["diffusers_bf16"]["step_s_ratio"] == 1.0
        and infer["diffusers_bf16"]["max_abs_diff"] == 0
    )
    # the same weights, adapters and inputs: bf16 losses agree, the forward differs by bf16
    # roundings only
    assert (
        abs(train["minicat_bf16"]["first_loss"] / train["diffusers_bf16"]["first_loss"] - 1) < 0.02
    ), train
    assert infer["minicat_int8"]["max_abs_diff"] < 0.05 * r["output_max_abs"], (
        infer,
        r["output_max_abs"],
    )
    # 8-bit and offloaded weights take less memory than bf16 ones (PeakMemory counts are exact on a
    # CPU)
    assert train["minicat_int8"]["peak_gb"] < train["minicat_bf16"]["peak_gb"], train
    w = rel["weights_gb"]
    assert w["minicat_int8_offload"] < w["minicat_int8"] < w["minicat_bf16"], w
    assert "enable_cudnn_sdp(False)" in stdout and "minicat int8, offload 2/3" in stdout, stdout


def test_a_first_loss_off_diffusers_stops_the_run():
    size = {**bench.SIZES["small"], "res": (64,), "warmup": 1, "steps": 1}
    rel = {
        "weights_gb": {},
        "res": {"64": {"train": {"diffusers_bf16": {"first_loss": 100.0}}, "infer": {}}},
    }
    args = Namespace(device=torch.device("cpu"), compile=False)
    with pytest.raises(SystemExit, match="first loss of minicat_bf16 at 64"):
        bench.run_setup(bench.SETUPS[1], size, args, rel, {64: {}})
    assert 0.5 < rel["res"]["64"]["train"]["minicat_bf16"]["first_loss"] < 3, rel


def test_peak_flops_by_gpu_name():
    assert bench.peak_flops("NVIDIA H200")[0] == bench.peak_flops("NVIDIA H100 80GB HBM3")[0] == 989
    assert (
        bench.peak_flops("NVIDIA H100 PCIe")[0] == 756 and bench.peak_flops("NVIDIA L40S")[0] == 362
    )
    assert (
        bench.peak_flops("NVIDIA GH200 480GB")[0] == 989 and bench.peak_flops("NVIDIA L4")[0] == 121
    )
    assert (
        "--peak-tflops" in bench.peak_flops("Tesla T4")[1]
        and bench.peak_flops("x", 500.0)[0] == 500
    )


def test_training_projection_is_sane():
    int8, bf16 = (
        bench.project_training(512, "int8", check=True),
        bench.project_training(512, "none"),
    )
    # 6,270,668,864 parameters, 99% of them in int8
    assert 6.27e9 < int8["weights (exact)"] < 6.4e9, int8
    assert bf16["weights (exact)"] == 2 * 6_270_668_864, bf16
    assert 6.27e9 < int8["total (projected)"] < bf16["total (projected)"], (int8, bf16)
    # one [1, S, 3072] bf16 tensor
    stream = int8["incoming block gradient (exact)"]
    assert 5 * stream < int8["largest in-block peak (fake)"] < 60 * stream, int8
    # the sum of parts against a whole checkpointed training step on fake tensors
    check = int8["whole model on fake tensors (check)"]
    assert abs(int8["total (projected)"] / check - 1) < 0.05, int8


def test_peak_memory_counts_what_autograd_keeps():
    w, kib = torch.randn(256, 256, requires_grad=True), 1024
    with bench.PeakMemory() as pm:
        # the input (saved for w's gradient) 64 KiB, the relu output 64 KiB
        y = (torch.randn(64, 256) @ w).relu()
        # + its gradient 64 KiB + w.grad 256 KiB at the peak; then the input is freed
        y.sum().backward()
    assert abs(pm.peak - 448 * kib) < 64 and pm.live == 320 * kib, (pm.peak, pm.live)
