"""bench.py runs, and its memory projection of the released model is sane (fake tensors: no 6B weights)."""

from conftest import run_script

import bench


def test_help_runs():
    assert "--quick" in run_script("bench.py", "--help").stdout


def test_training_projection_is_sane():
    int8, bf16 = bench.project_training(512, "int8"), bench.project_training(512, "none")
    assert 6.27e9 < int8["weights (exact)"] < 6.4e9, int8  # 6,270,668,864 params, 99% of them in int8
    assert bf16["weights (exact)"] == 2 * 6_270_668_864, bf16
    assert 6.27e9 < int8["total (projected)"] < bf16["total (projected)"], (int8, bf16)
    stream = int8["incoming block gradient (exact)"]  # one [1, S, 3072] bf16 tensor
    assert 5 * stream < int8["largest in-block peak (fake)"] < 60 * stream, int8


def test_peak_memory_counts_what_autograd_keeps():
    import torch

    w, kib = torch.randn(256, 256, requires_grad=True), 1024
    with bench.PeakMemory() as pm:
        y = (torch.randn(64, 256) @ w).relu()  # input (saved for w's gradient) 64 KiB; relu output 64 KiB
        y.sum().backward()  # + its gradient 64 KiB + w.grad 256 KiB at the peak; then the input is freed
    assert abs(pm.peak - 448 * kib) < 64 and pm.live == 320 * kib, (pm.peak, pm.live)
