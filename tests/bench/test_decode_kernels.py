"""bench/experiments/decode_kernels.py: the split of a decode step into matmuls, other kernels and idle time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "experiments"))

from decode_kernels import is_matmul, kernel_summary  # noqa: E402


def test_a_step_splits_into_matmuls_other_kernels_and_idle():
    # two replays of: a GEMV (10 µs), an overlapping norm kernel (4 µs, 2 of them inside the GEMV), an attention
    # kernel (6 µs) after a 5 µs gap; each replay 30 µs of wall time
    one = [("gemv2T_kernel_val<bf16>", 0.0, 10.0), ("triton_red_fused_rms_norm_0", 8.0, 4.0),
           ("flash_fwd_splitkv_kernel", 17.0, 6.0)]
    kernels = one + [(n, s + 30.0, d) for n, s, d in one]
    r = kernel_summary(kernels, replays=2, wall_s=60e-6, weight_bytes=10_000_000)
    assert r["kernels_per_step"] == 3
    assert r["busy_ms"] == pytest.approx(0.018)  # 0-12 and 17-23 µs
    assert r["idle_ms"] == pytest.approx(0.012)
    assert r["matmul_ms"] == pytest.approx(0.010) and r["other_kernels_ms"] == pytest.approx(0.010)
    assert r["matmul_tb_s"] == pytest.approx(1.0)  # 10 MB in 10 µs
    assert r["kernels"][0]["name"].startswith("gemv") and r["kernels"][0]["matmul"]


def test_flash_attention_is_not_counted_as_a_matmul():
    assert is_matmul("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT") and is_matmul("sm90_xmma_gemm_bf16bf16")
    assert not is_matmul("flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, false, cutlass::bfloat16_t>>")
