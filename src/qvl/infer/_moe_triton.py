"""The Triton kernels of qvl.infer.moe_kernels (read its notes), as plain functions: ``moe_kernels`` jits them when
first used. A module of their own, without postponed annotations, whose global ``tl`` Triton's interpreter can
patch."""

import triton
import triton.language as tl

from qvl.infer._launch_triton import let_next_start, wait_for_previous
from qvl.infer._norm_triton import normed, rms_scale


@triton.jit
def top_k_routes(logits_row, E: tl.constexpr, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr):
    """A row's router logits (E of them) -> the k largest softmax probabilities renormalised (float32) and their
    expert ids (int64), largest first, each a (TOP_K_PAD,) block whose slots past k are 0. The softmax in float32 as
    the Hugging Face router computes it; ties: the lower id, as torch.topk."""
    offs = tl.arange(0, E)
    x = tl.load(logits_row + offs).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    # the k largest kept in registers, one round each. With all E x E pairs ranked at once instead (16k comparisons a
    # row for the route kernel's one warp) a 1-row 30B-A3B step took 4.09 ms, 3.76 with these rounds (H100s,
    # 2026-12-07: bench/results/decode_moe_route_h100.json, decode_moe_rounds_h100.json)
    slots = tl.arange(0, TOP_K_PAD)
    best_k = tl.zeros([TOP_K_PAD], dtype=tl.float32)
    ids_k = tl.zeros([TOP_K_PAD], dtype=tl.int64)
    left, total = p, 0.0
    for j in tl.static_range(TOP_K):
        best = tl.max(left, 0)
        at = tl.argmax(left, 0)
        total += best
        best_k = tl.where(slots == j, best, best_k)
        ids_k = tl.where(slots == j, at.to(tl.int64), ids_k)
        left = tl.where(offs == at, -1.0, left)
    return best_k / total, ids_k


def route_kernel(logits_ptr, weights_ptr, ids_ptr, stride_row, E: tl.constexpr, TOP_K: tl.constexpr,
                 TOP_K_PAD: tl.constexpr, PDL: tl.constexpr):
    # PDL (each kernel here): the next kernel may start at once; this one reads nothing before the one before ended
    let_next_start(PDL)
    wait_for_previous(PDL)
    row = tl.program_id(0)
    best, ids = top_k_routes(logits_ptr + row * stride_row, E, TOP_K, TOP_K_PAD)
    slots = tl.arange(0, TOP_K_PAD)
    ok = slots < TOP_K
    tl.store(weights_ptr + row * TOP_K + slots, best.to(weights_ptr.dtype.element_ty), mask=ok)
    tl.store(ids_ptr + row * TOP_K + slots, ids, mask=ok)


def gate_up_kernel(x_ptr, ids_ptr, w_ptr, act_ptr, norm_ptr, logits_ptr, weights_ptr, H, INTER, stride_x,
                   stride_we, stride_wn, stride_logits, eps, TOP_K: tl.constexpr, NORM: tl.constexpr,
                   ROUTE: tl.constexpr, E: tl.constexpr, TOP_K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # NORM: the row is first RMS-normalised and scaled by norm_ptr's weight, rounded where Qwen3VLTextRMSNorm rounds
    # (as qvl.infer._gemv_triton's kernel: each program sums its row's squares itself). ROUTE: the pair's expert is
    # chosen here from the row's router logits (each program takes their top-k itself: E values, in cache), not
    # read from ids_ptr; the programs of the first block of columns write each pair's id and weight for the down
    # kernel
    let_next_start(PDL)
    wait_for_previous(PDL)  # the expert ids or router logits: which weights to read comes from the kernel before
    pair = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    if ROUTE:
        best, ids = top_k_routes(logits_ptr + (pair // TOP_K) * stride_logits, E, TOP_K, TOP_K_PAD)
        mine = tl.arange(0, TOP_K_PAD) == pair % TOP_K
        expert = tl.sum(tl.where(mine, ids, 0), 0)
        first = tl.program_id(1) == 0
        tl.store(ids_ptr + pair, expert, mask=first)
        tl.store(weights_ptr + pair, tl.sum(tl.where(mine, best, 0.0), 0).to(weights_ptr.dtype.element_ty),
                 mask=first)
    else:
        expert = tl.load(ids_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // TOP_K) * stride_x
    if NORM:
        scale = rms_scale(x_row, H, eps, BLOCK_K)
    gate_rows = w_ptr + expert * stride_we + cols[:, None] * stride_wn
    up_rows = gate_rows + INTER * stride_wn
    dtype = act_ptr.dtype.element_ty
    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, H, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        x = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            x = normed(x, scale, tl.load(norm_ptr + ks, mask=k_ok, other=0.0), dtype)
        x = x[None, :]
        ok = col_ok[:, None] & k_ok[None, :]
        gate += tl.sum(tl.load(gate_rows + ks[None, :], mask=ok, other=0.0).to(tl.float32) * x, 1)
        up += tl.sum(tl.load(up_rows + ks[None, :], mask=ok, other=0.0).to(tl.float32) * x, 1)
    gate = gate.to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    act = silu * up.to(dtype).to(tl.float32)
    tl.store(act_ptr + pair * INTER + cols, act.to(dtype), mask=col_ok)

def down_kernel(act_ptr, weights_ptr, w_ptr, ids_ptr, out_ptr, H, INTER, stride_we, stride_wh,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # one program per (row, expert) pair and block of hidden columns, as gate_up_kernel: the pair's weighted product,
    # rounded as the plain path rounds it; the k-sum over a row's pairs is left to the caller (moe_kernels.experts)
    let_next_start(PDL)
    wait_for_previous(PDL)
    pair = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    dtype = out_ptr.dtype.element_ty
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    weight = tl.load(weights_ptr + pair).to(tl.float32)
    rows = w_ptr + expert * stride_we + cols[:, None] * stride_wh
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, INTER, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < INTER
        a = tl.load(act_ptr + pair * INTER + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        w = tl.load(rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a, 1)
    tl.store(out_ptr + pair * H + cols, (acc.to(dtype).to(tl.float32) * weight).to(dtype), mask=col_ok)

def down_sum_kernel(act_ptr, weights_ptr, w_ptr, ids_ptr, res_ptr, out_ptr, H, INTER, stride_we, stride_wh,
                    stride_res, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # one program per (row, block of hidden columns): the row's k pairs' weighted products, each rounded as
    # down_kernel rounds it, summed in float32 and rounded as moe_kernels.experts sums them, then added to the
    # residual (the layer's output, as the decoder's residual add rounds it): no (B, k, H) products, no kernel after
    let_next_start(PDL)
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    dtype = out_ptr.dtype.element_ty
    slots = tl.arange(0, TOP_K_PAD)
    slot_ok = slots < TOP_K
    pairs = row * TOP_K + slots
    experts = tl.load(ids_ptr + pairs, mask=slot_ok, other=0).to(tl.int64)
    weights = tl.load(weights_ptr + pairs, mask=slot_ok, other=0.0).to(tl.float32)
    rows = w_ptr + experts[:, None, None] * stride_we + cols[None, :, None] * stride_wh  # (k, BLOCK_N, 1)
    rows_ok = slot_ok[:, None, None] & col_ok[None, :, None]
    acc = tl.zeros([TOP_K_PAD, BLOCK_N], dtype=tl.float32)
    for start in range(0, INTER, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < INTER
        a = tl.load(act_ptr + pairs[:, None] * INTER + ks[None, :], mask=slot_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(rows + ks[None, None, :], mask=rows_ok & k_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a[:, None, :], 2)
    products = (acc.to(dtype).to(tl.float32) * weights[:, None]).to(dtype).to(tl.float32)
    y = tl.sum(tl.where(slot_ok[:, None], products, 0.0), 0).to(dtype).to(tl.float32)
    res = tl.load(res_ptr + row * stride_res + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + cols, (res + y).to(dtype), mask=col_ok)
