"""One decode step's attention (one query per row over its cache) as split-key ("flash-decoding") Triton programs.

The plain step (qvl.infer.decode.attend) takes three kernels a layer: the scores' batched matmul, the masked softmax
and the probabilities' matmul: 13 us a layer of the 30B-A3B batch-1 step for its 2.2 MB of keys and values at
1,094 tokens (H100, 2026-12-06, bench/experiments/results/moe_decode_step_fused_h100.txt), and each leaves a
(B, Hq, L) tensor behind. Here :func:`attend` runs one program per (row, kv head, chunk of keys): the kv head's
query heads (grouped-query attention: its keys are read once for all of them) over the chunk with an online softmax;
then its query heads' chunks are merged in float32: by the last of its programs to finish (:data:`MERGE_IN_SPLIT`),
or by one program per (row, query head) of a merge kernel. Chunks are as small as it takes for the step to
fill the card (:func:`chunk_for`). Values are rounded where the plain path rounds them (the scores to the model's
dtype before the float32 softmax; the probabilities to it before they weight the values, here unnormalised), so
outputs match it up to that and the sums' order (tests/infer/test_attend_kernels.py).

A custom op (``qvl::attend_decode``): torch.compile leaves it whole and CUDA graphs capture its launches. Where it
cannot run (:func:`runs`: a CPU without ``TRITON_INTERPRET=1``, an odd head width) :func:`attend` is the plain path.
"""

from __future__ import annotations

import functools

import torch

from qvl.infer.triton_support import available, interpreting, on_device, overlap

# Keys a program reads: at most MAX_CHUNK, halved (down to MIN_CHUNK) until the step makes PROGRAMS_PER_SM
# programs for each of the card's multiprocessors. With a fixed 128, 30B-A3B's batch-1 step at 1,094 keys made 36
# programs (4 kv heads x 9 chunks) for an H100's 132 multiprocessors, and attended in 5.3 ms a step against 4.5 for the
# plain path (bench/results/decode_moe_fused_down_h100.json); the 8B's (8 kv heads) 72. One program a multiprocessor
# was the fastest of 1, 2, 4 and 8 on both shapes at 1 row x 1,100 keys (30B-A3B 4.24 ms a step against 4.45 at 2 and
# 4.38 plain; 8B 6.77 against 6.82 and 6.91) and level at 32 rows x 300 (H100, 2026-12-06,
# bench/results/decode_moe_split_h100.json, decode_8b_split_h100.json: attention_split_programs_per_sm).
MAX_CHUNK = 128
MIN_CHUNK = 16
PROGRAMS_PER_SM = 1
MAX_SPLITS = 512  # chunks grow past MAX_CHUNK beyond this many (a long context): the merge reads every chunk's output
BLOCK_L = 64  # keys per block inside a chunk (a smaller chunk: the chunk)
# chunks per block of the merge: all of them in one pass up to 64 (each pass waits on its loads), at least 16
BLOCK_S = (16, 64)
NUM_WARPS = 4
# The merge done by the split kernel's last program of each (row, kv head) (an atomic count in a buffer of the
# device's that each such program leaves at 0), so a step attends in one kernel a layer instead of two. The count
# makes two attention kernels running at once on one device (two streams) unsafe: the decode step runs on one. Off:
# slower, 20.4 against 8.1 us a call at 1 row x 1,100 keys, 31.1 against 16.3 at 32 rows x 300 (30B-A3B's heads,
# bench/experiments/results/attend_merge_h100.json), steps 4.48 against 3.75 ms and 25.06 against 24.44 (equal
# logits; H100, 2026-12-07, bench/results/decode_moe_rounds_h100.json ``merge_ms``): the last program merges its 8
# query heads one after another, a tail the whole kernel waits on, where the merge kernel spreads them over 32
# programs. Right on an H100 (bench/experiments/results/route_merge_cuda_tests_h100.txt)
MERGE_IN_SPLIT = False
COUNTS = 1 << 16  # (row, kv head) counters a device's buffer holds; a step of more runs the merge kernel
H100_SMS = 132  # where there is no CUDA device (Triton's interpreter): the chunks an H100 would get


def takes(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel runs for heads of ``head_dim`` in ``dtype`` on ``device``: Triton there, a power-of-two
    head width of at least 16 (tl.dot's least), a dtype tl.dot takes."""
    return (available(device) and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and dtype in (torch.bfloat16, torch.float16, torch.float32))


def runs(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernel takes this step (:func:`takes`, and keys / values whose head dimension is contiguous)."""
    return takes(q.device, q.shape[-1], q.dtype) and keys.stride(-1) == 1 and values.stride(-1) == 1


@functools.cache
def _kernels():
    import triton

    from qvl.infer import _attend_triton as k

    return triton, triton.jit(k.attend_split_kernel), triton.jit(k.attend_merge_kernel)


_COUNTS_BY_DEVICE: dict = {}


def _counts(device: torch.device) -> torch.Tensor | None:
    """The device's (row, kv head) counters of the merging split kernel, zero (each call leaves them so); None while
    a CUDA graph is being captured and they do not exist yet (zeroing them in the graph would leave them unset until
    its first replay: that step merges in a kernel of its own)."""
    counts = _COUNTS_BY_DEVICE.get(device)
    if counts is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        counts = _COUNTS_BY_DEVICE[device] = torch.zeros(COUNTS, dtype=torch.int32, device=device)
    return counts


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SMS


def chunk_for(rows: int, n_kv: int, n_keys: int, multiprocessors: int) -> int:
    """Keys per program: the largest power of two from MAX_CHUNK down to MIN_CHUNK that gives ``rows`` x ``n_kv`` x
    chunks at least PROGRAMS_PER_SM programs a multiprocessor, then doubled while there are more than MAX_SPLITS
    chunks."""
    chunk = MAX_CHUNK
    while chunk > MIN_CHUNK and rows * n_kv * -(-n_keys // chunk) < PROGRAMS_PER_SM * multiprocessors:
        chunk //= 2
    while -(-n_keys // chunk) > MAX_SPLITS:
        chunk *= 2
    return chunk


@torch.library.custom_op("qvl::attend_decode", mutates_args=())
def attend_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
                  chunk: int = 0) -> torch.Tensor:
    """q (B, Hq, D), keys / values (B, Hkv, L, D), mask (B, L) -> (B, Hq * D) in q's dtype: one program per (row,
    kv head, chunk of keys) leaves each query head's running max, sum of exponentials and unnormalised output per
    chunk (float32), then the last of a (row, kv head)'s programs (:data:`MERGE_IN_SPLIT`), or one program per (row,
    query head) of a second kernel, merges them. ``chunk``: keys per program, else
    :func:`chunk_for` (decided here, on the concrete shapes, so a compiled caller's graph does not depend on it)."""
    b, n_q, d = q.shape
    n_kv, n_keys = keys.shape[1], keys.shape[2]
    chunk = chunk or chunk_for(b, n_kv, n_keys, _multiprocessors(q.device))
    s = -(-n_keys // chunk)
    triton, split_kernel, merge_kernel = _kernels()
    q, mask = q.contiguous(), mask.contiguous()
    m = torch.empty(b, n_q, s, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b, n_q, s, d, dtype=torch.float32, device=q.device)
    out = torch.empty(b, n_q, d, dtype=q.dtype, device=q.device)
    group = n_q // n_kv
    block_s = min(max(triton.next_power_of_2(s), BLOCK_S[0]), BLOCK_S[1])
    counts = _counts(q.device) if MERGE_IN_SPLIT else None
    merge = counts is not None and b * n_kv <= counts.numel()
    with on_device(q.device):
        split_kernel[(b, n_kv, s)](
            q, keys, values, mask.view(torch.uint8), m, l_sum, acc, out, counts if merge else m, n_keys,
            s, scale, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, CHUNK=chunk,
            BLOCK_L=min(BLOCK_L, chunk), BLOCK_S=block_s, MERGE=merge, DOT_FP32=interpreting(), num_warps=NUM_WARPS,
            **overlap(q.device))
        if not merge:
            merge_kernel[(b * n_q,)](m, l_sum, acc, out, s, D=d, BLOCK_S=block_s, num_warps=NUM_WARPS,
                                     **overlap(q.device))
    return out.reshape(b, n_q * d)


@attend_decode.register_fake
def _(q, keys, values, mask, scale, chunk=0):
    b, n_q, d = q.shape
    return q.new_empty(b, n_q * d)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
           chunk: int = 0) -> torch.Tensor:
    """As qvl.infer.decode.attend: q (B, Hq, D), keys/values (B, Hkv, L, D), mask (B, L) -> (B, Hq*D).
    ``chunk``: keys per program (tests), else :func:`chunk_for`'s."""
    if not runs(q, keys, values):
        from qvl.infer.decode import attend as plain

        return plain(q, keys, values, mask, scale)
    return attend_decode(q, keys, values, mask, scale, chunk)
