"""The Triton kernel of qvl.infer.attend_kernels (read its notes), as a plain function: ``attend_kernels`` jits it
when first used. A module of its own, without postponed annotations, whose global ``tl`` Triton's interpreter can
patch."""

import triton
import triton.language as tl

from qvl.infer._launch_triton import let_next_start, wait_for_previous


def attend_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, counts_ptr, n_keys,
                        n_splits, scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
                        stride_vl, stride_mb, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, MERGE: tl.constexpr,
                        DOT_FP32: tl.constexpr, PDL: tl.constexpr):
    # one program per (row, kv head, chunk of keys): the kv head's GROUP query heads over the chunk, an online
    # softmax; it leaves each query head's running max, sum of exponentials and unnormalised output for the merge.
    # MERGE: the last of a (row, kv head)'s programs to finish (counted in counts_ptr, which starts and is left at 0)
    # merges its query heads itself, and no merge kernel runs.
    # PDL (both kernels here): the next kernel may start at once; this one reads after the one before ended
    let_next_start(PDL)
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)  # cache offsets pass 2**31 elements (8 kv heads x 40k keys x 128 at row 52)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    dtype = q_ptr.dtype.element_ty
    heads = tl.arange(0, GROUP_PAD)
    head_ok = heads < GROUP
    ds = tl.arange(0, D)
    q_head = kv_head * GROUP + heads
    q = tl.load(q_ptr + row * stride_qb + q_head[:, None] * stride_qh + ds[None, :], mask=head_ok[:, None],
                other=0.0)
    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)  # finite: a chunk with no key left adds nothing
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    for off in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK_L):
        keys = off + tl.arange(0, BLOCK_L)
        in_range = keys < n_keys
        keep = tl.load(mask_ptr + row * stride_mb + keys, mask=in_range, other=0) != 0
        # keys and values outside the mask are not read: whatever a stale slot holds (even NaN) adds nothing
        k = tl.load(k_base + keys[:, None] * stride_kl + ds[None, :], mask=keep[:, None], other=0.0)
        if DOT_FP32:  # Triton's interpreter multiplies bf16 blocks wrongly: the same products in float32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = s.to(dtype).to(tl.float32) * scale  # rounded as the plain path's matmul leaves them, then scaled
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vl + ds[None, :], mask=keep[:, None], other=0.0)
        p = p.to(dtype)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    n_q = tl.num_programs(1) * GROUP
    at = (row * n_q + q_head) * n_splits + split  # (B, Hq, splits)
    tl.store(m_ptr + at, m_i, mask=head_ok)
    tl.store(l_ptr + at, l_i, mask=head_ok)
    tl.store(acc_ptr + at[:, None] * D + ds[None, :], acc, mask=head_ok[:, None])
    if MERGE:
        counter = counts_ptr + row * tl.num_programs(1) + kv_head
        tl.debug_barrier()  # every thread's stores above made before the count (released with it) says they were
        if tl.atomic_add(counter, 1, sem="acq_rel") == n_splits - 1:  # the last: every chunk's results are stored
            for h in tl.static_range(GROUP):
                merge_head(m_ptr, l_ptr, acc_ptr, out_ptr, row * n_q + kv_head * GROUP + h, n_splits, D, BLOCK_S)
            tl.store(counter, 0)  # for the next call (a CUDA graph replays this one): no kernel to zero it


@triton.jit
def merge_head(m_ptr, l_ptr, acc_ptr, out_ptr, at, n_splits, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Query head ``at`` (row * Hq + head): its chunks' partial results merged in float32, against the largest
    running max of them, and its output written in the model's dtype. Read past the L1 cache (".cg"): written by
    other programs of the same kernel where the split kernel merges."""
    ds = tl.arange(0, D)
    offs = tl.arange(0, BLOCK_S)
    top = tl.full([BLOCK_S], -1.0e30, dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        top = tl.maximum(top, tl.load(m_ptr + at * n_splits + s0 + offs, mask=s0 + offs < n_splits, other=-1.0e30,
                                      cache_modifier=".cg"))
    m_max = tl.max(top, 0)
    num = tl.zeros([D], dtype=tl.float32)
    den = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        ok = s0 + offs < n_splits
        w = tl.exp(tl.load(m_ptr + at * n_splits + s0 + offs, mask=ok, other=-1.0e30, cache_modifier=".cg") - m_max)
        den += tl.load(l_ptr + at * n_splits + s0 + offs, mask=ok, other=0.0, cache_modifier=".cg") * w
        part = tl.load(acc_ptr + (at * n_splits + s0 + offs)[:, None] * D + ds[None, :], mask=ok[:, None], other=0.0,
                       cache_modifier=".cg")
        num += tl.sum(part * w[:, None], 0)
    tl.store(out_ptr + at * D + ds, (num / tl.sum(den, 0)).to(out_ptr.dtype.element_ty))


def attend_merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, n_splits, D: tl.constexpr, BLOCK_S: tl.constexpr,
                        PDL: tl.constexpr):
    # one program per (row, query head): merge_head
    let_next_start(PDL)
    wait_for_previous(PDL)
    merge_head(m_ptr, l_ptr, acc_ptr, out_ptr, tl.program_id(0), n_splits, D, BLOCK_S)
