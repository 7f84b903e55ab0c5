"""qvl's Triton attention for the frozen vision tower (qvl.models.segment_attention): full attention inside each
segment, the values of sdpa per segment. On CPU through Triton's interpreter; on a GPU against flash varlen, compiled
too, and chosen only where no gradient is asked for."""

import subprocess
import sys
import textwrap

import pytest
import torch

from qvl.models.segment_attention import _split_head_dim

INTERPRETED = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from qvl.models.segment_attention import attend

    torch.manual_seed(0)
    for head_dim in (72, 64, 40):
        lengths = [5, 70, 33, 128, 1, 16]  # whole blocks, partial blocks, a single patch
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        q, k, v = (torch.randn(sum(lengths), 2, head_dim) for _ in range(3))
        got = attend(q, k, v, cu, max(lengths) + 9, scale=0.3, blocks=(16, 16, 1, 1))  # a loose upper bound
        want = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=0.3)
                          .transpose(0, 1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_head_dim_split():
    assert _split_head_dim(72) == (64, 16)
    assert _split_head_dim(64) == (64, 0)
    assert _split_head_dim(80) == (64, 16)
    assert _split_head_dim(40) == (32, 16)
    assert _split_head_dim(112) == (64, 64)


@pytest.mark.slow
def test_kernel_gives_sdpa_per_segment_in_the_interpreter():
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on a GPU")
def test_kernel_matches_flash_varlen_on_a_gpu():
    from qvl.data.packing import varlen_available, varlen_causal
    from qvl.models import attention, segment_attention

    if not varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    lengths = [1, 640, 640, 3001, 64, 5200, 129]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, 16, sum(lengths), 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    want = varlen_causal(q, k, v, cu, max(lengths), 72 ** -0.5, causal=False).float()
    got, _ = attention.vision_varlen_attention(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lengths))
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    compiled = torch.compile(lambda *a: attention.vision_varlen_attention(None, *a, None, cu_seq_lens_q=cu,
                                                                          max_length_q=max(lengths))[0],
                             dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v).float(), want, atol=2e-2, rtol=2e-2)
    assert segment_attention.usable(q, k, v)
    q.requires_grad_(True)  # a tower that trains: flash varlen, which has a backward
    assert not segment_attention.usable(q, k, v)
    with torch.no_grad():
        assert segment_attention.usable(q, k, v)
