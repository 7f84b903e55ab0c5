"""One decode step's attention (one query per row over its cache) as split-key ("flash-decoding") Triton programs.

The plain step (qvl.infer.decode.attend) takes three kernels a layer: the scores' batched matmul, the masked softmax
and the probabilities' matmul: 13 us a layer of the 30B-A3B batch-1 step for its 2.2 MB of keys and values at
1,094 tokens (H100, 2026-12-06, bench/experiments/results/moe_decode_step_fused_h100.txt), and each leaves a
(B, Hq, L) tensor behind. Here :func:`attend` runs one program per (row, kv head, chunk of ``CHUNK`` keys): the kv
head's query heads (grouped-query attention: its keys are read once for all of them) over the chunk with an online
softmax, then merges the chunks in float32 (plain torch: compiled, one small kernel). Values are rounded where the
plain path rounds them (the scores to the model's dtype before the float32 softmax; the probabilities to it before
they weight the values, here unnormalised), so outputs match it up to that and the sums' order
(tests/infer/test_attend_kernels.py).

A custom op (``qvl::attend_splits``): torch.compile leaves it whole and CUDA graphs capture its launch. Where it
cannot run (:func:`runs`: a CPU without ``TRITON_INTERPRET=1``, an odd head width) :func:`attend` is the plain path.
"""

from __future__ import annotations

import functools

import torch

from qvl.infer.triton_support import available, interpreting, on_device

# keys a program reads (in blocks of BLOCK_L): 1,094 keys at batch 1 make 9 chunks for each of 4 kv heads
CHUNK = 128
BLOCK_L = 64
NUM_WARPS = 4


def takes(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel runs for heads of ``head_dim`` in ``dtype`` on ``device``: Triton there, a power-of-two
    head width of at least 16 (tl.dot's least), a dtype tl.dot takes."""
    return (available(device) and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and dtype in (torch.bfloat16, torch.float16, torch.float32))


def runs(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernel takes this step (:func:`takes`, and keys / values whose head dimension is contiguous)."""
    return takes(q.device, q.shape[-1], q.dtype) and keys.stride(-1) == 1 and values.stride(-1) == 1


@functools.cache
def _kernel():
    import triton

    from qvl.infer import _attend_triton as k

    return triton, triton.jit(k.attend_split_kernel)


def n_splits(n_keys) -> int:
    return (n_keys + CHUNK - 1) // CHUNK


@torch.library.custom_op("qvl::attend_splits", mutates_args=())
def attend_splits(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, Hq, D), keys / values (B, Hkv, L, D), mask (B, L) -> per query head and chunk of keys: the running max
    (B, Hq, S), the sum of exponentials (B, Hq, S) and the unnormalised output (B, Hq, S, D), float32."""
    b, n_q, d = q.shape
    n_kv, n_keys = keys.shape[1], keys.shape[2]
    s = n_splits(n_keys)
    triton, kernel = _kernel()
    q, mask = q.contiguous(), mask.contiguous()
    m = torch.empty(b, n_q, s, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b, n_q, s, d, dtype=torch.float32, device=q.device)
    group = n_q // n_kv
    with on_device(q.device):
        kernel[(b, n_kv, s)](
            q, keys, values, mask.view(torch.uint8), m, l_sum, acc, n_keys, s, scale,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, CHUNK=CHUNK, BLOCK_L=BLOCK_L,
            DOT_FP32=interpreting(), num_warps=NUM_WARPS)
    return m, l_sum, acc


@attend_splits.register_fake
def _(q, keys, values, mask, scale):
    b, n_q, d = q.shape
    s = n_splits(keys.shape[2])
    m = q.new_empty(b, n_q, s, dtype=torch.float32)
    return m, torch.empty_like(m), q.new_empty(b, n_q, s, d, dtype=torch.float32)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """As qvl.infer.decode.attend: q (B, Hq, D), keys/values (B, Hkv, L, D), mask (B, L) -> (B, Hq*D)."""
    if not runs(q, keys, values):
        from qvl.infer.decode import attend as plain

        return plain(q, keys, values, mask, scale)
    b, n_q, d = q.shape
    m, l_sum, acc = attend_splits(q, keys, values, mask, scale)
    w = torch.exp(m - m.amax(-1, keepdim=True))  # each chunk's share, against the row's largest score
    out = (acc * w[..., None]).sum(-2) / (l_sum * w).sum(-1, keepdim=True)
    return out.to(q.dtype).reshape(b, n_q * d)
