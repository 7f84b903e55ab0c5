"""A mixture-of-experts layer's decode for a few rows in Triton kernels: the router's top-k, and the routed experts
reading only the rows of the experts each token picked.

The 30B-A3B batch-1 decode step took 7.02 ms against its 2.0 ms bandwidth bound (H100, 2026-12-05,
bench/experiments/results/moe_decode_step_h100.txt): 1,587 kernels, 33 a layer. The routing alone was 144 kernels
(softmax, top-k, the grouped path's sort and search: 0.74 ms), the experts' grouped GEMM read its 3.6 GB at ~51 % of
the card's bandwidth (2.36 ms) and the sort's index, scatter and copies took 0.58 ms more. Here, a layer's MoE half is
the router's GEMM (cuBLAS, or qvl.infer.gemv_kernels' GEMV at 1 row) and:

* :func:`route` — softmax (float32) over the experts, top-k, the k weights renormalised and cast back, as the
  Hugging Face router computes them (qvl.infer.decode.router_top_k): one program a row;
* :func:`experts` — per (row, expert) pair, ``silu(x @ gate^T) * (x @ up^T)``, then ``w_k * (act_k @ down_k^T)``
  (each kernel one program per pair and block of output columns), summed over a row's k pairs in float32 outside
  the kernels: compiled, that sum joins the residual add's kernel. With the layer's residual given and
  :data:`SUM_IN_DOWN`, a down_sum kernel (one program per row and block of hidden columns) sums the k products and
  adds the residual itself, and no (B, k, H) products are left. The values are rounded where the plain path rounds
  them (each product to the model's dtype), so outputs match it up to the order of the sums.
  Each pair reads its expert's rows whole: with many rows sharing experts the grouped GEMM (each selected expert read
  once) reads less, so this is for a few rows;
* :func:`routed_experts` — both in two kernels: the gate_up kernel takes the top-k from the router's logits itself
  (:data:`ROUTE_IN_GATE_UP`).

The route and the experts' kernels are custom ops (``qvl::moe_route``, ``qvl::moe_expert_outputs``,
``qvl::moe_experts_added``, ``qvl::moe_routed_outputs``): torch.compile leaves them whole and CUDA graphs capture
their launches. On a CPU they run the plain path's operations, except under ``TRITON_INTERPRET=1``, where Triton's
interpreter runs the kernels themselves (tests/infer/test_moe_kernels.py compares the two).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qvl.infer.triton_support import available, on_device, overlap

# tile sizes, per kernel: (a block of output columns, a block of the reduced dimension, warps), one program each.
# The fastest at 1 row of the 30B-A3B shape (the decoder fuses up to 8 rows by default; tuned at 1 and 4), H100, 2026-12-06,
# bench/experiments/moe_kernel_tune.py, bench/experiments/results/moe_kernel_tune_fused_down_h100.json: gate_up
# 8 x 256 with 8 warps 20.4 us a layer, down 16 x 128 with 8 warps 11.2 us (a program per (row, expert) pair; the
# down kernel before it, a program per row summing its k pairs, took 19.6); both 33.9 us against 91.1 for the
# grouped GEMM. At 4 rows gate_up kept its tile, down was fastest at 8 x 256 with 4 warps (33.4 us against 44.1)
GATE_UP_TILE = (8, 256, 8)
DOWN_TILE = (16, 128, 8)
# The down_sum kernel (a program per row and block of hidden columns, the row's k experts' products summed in it and
# the residual added: no (B, k, H) products and no compiled sum kernel after it) and its tile. Off: slower than the
# down kernel and the compiled sum after it, 35.1 against 33.5 us a 30B-A3B layer's experts with the residual at 1 row,
# 101.6 against 99.6 at 4 (down_sum 15.3 us against 10.6 + 1.6; H100, 2026-12-06,
# bench/experiments/results/moe_kernel_tune_down_sum_h100.json): its programs read k experts' rows each, too few
# programs for the card
SUM_IN_DOWN = False
DOWN_SUM_TILE = (8, 128, 8)
# The router's top-k taken inside the gate_up kernel (each of its programs takes its row's top-k itself), so no
# route kernel runs between the router's GEMV and the experts (:func:`routed_experts`). Off: slower, 3.92 against
# 3.76 ms a 1-row 30B-A3B step and 11.50 against 10.52 at 8 rows, equal logits (H100, 2026-12-07,
# bench/results/decode_moe_rounds_h100.json ``route_ms``): ~770 programs each take the top-k before their first weight
# read, one route kernel's worth of work on every program's critical path (ranked over all E x E pairs instead:
# 4.72 against 3.95, decode_moe_route_h100.json)
ROUTE_IN_GATE_UP = False
# the route kernel's warps: its 128 router probabilities fit one warp, whose top-k rounds then reduce by shuffles alone
ROUTE_WARPS = 1


@functools.cache
def _kernels():
    """(triton, route, gate_up, down, down_sum): the kernels of qvl.infer._moe_triton, jitted now (so Triton's
    interpreter, if asked for by then, runs them)."""
    import triton

    from qvl.infer import _moe_triton as k

    return (triton, triton.jit(k.route_kernel), triton.jit(k.gate_up_kernel), triton.jit(k.down_kernel),
            triton.jit(k.down_sum_kernel))


def _plain_route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype), ids


def _plain_expert_outputs(h, weights, ids, gate_up, down) -> torch.Tensor:
    b, k = ids.shape
    flat = ids.reshape(-1)
    x = h.repeat_interleave(k, dim=0)
    gate, up = torch.bmm(gate_up[flat], x[:, :, None])[:, :, 0].chunk(2, dim=-1)
    act = F.silu(gate) * up
    y = torch.bmm(down[flat], act[:, :, None])[:, :, 0]
    return (y * weights.reshape(-1, 1)).view(b, k, -1)


@torch.library.custom_op("qvl::moe_route", mutates_args=())
def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, E) -> (weights (B, k) in logits' dtype, expert ids (B, k) int64), largest first."""
    if not available(logits.device) or logits.shape[-1] & (logits.shape[-1] - 1):  # E a power of two (tl.arange)
        return _plain_route(logits, top_k)
    triton, route_kernel, *_ = _kernels()
    logits = logits.contiguous()
    b, e = logits.shape
    weights = torch.empty(b, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(b, top_k, dtype=torch.int64, device=logits.device)
    with on_device(logits.device):
        route_kernel[(b,)](logits, weights, ids, logits.stride(0), E=e, TOP_K=top_k,
                           TOP_K_PAD=triton.next_power_of_2(top_k), num_warps=ROUTE_WARPS, **overlap(logits.device))
    return weights, ids


@route.register_fake
def _(logits, top_k):
    b = logits.shape[0]
    return logits.new_empty(b, top_k), logits.new_empty(b, top_k, dtype=torch.int64)


def launch_gate_up(h: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor, tile=None,
                   norm: torch.Tensor | None = None, eps: float = 0.0, logits: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """The gate_up kernel: (B * k, I) activations ``silu(gate) * up`` of every (row, expert) pair; with ``norm``,
    of h RMS-normalised (``eps``) and scaled by it. With ``logits`` (B, E), the router's top-k is taken in the kernel
    (as :func:`route`) and written into ``ids`` and ``weights`` (B, k), which it then fills rather than reads."""
    triton, _, gate_up_kernel, *_ = _kernels()
    block_n, block_k, warps = tile or GATE_UP_TILE
    pairs, inter = ids.numel(), gate_up.shape[1] // 2
    act = torch.empty(pairs, inter, dtype=h.dtype, device=h.device)
    routed = logits is not None
    with on_device(h.device):
        gate_up_kernel[(pairs, triton.cdiv(inter, block_n))](
            h, ids, gate_up, act, h if norm is None else norm, logits if routed else h,
            weights if routed else h, h.shape[1], inter, h.stride(0), gate_up.stride(0), gate_up.stride(1),
            logits.stride(0) if routed else 0, eps, TOP_K=ids.shape[1], NORM=norm is not None, ROUTE=routed,
            E=logits.shape[1] if routed else 1, TOP_K_PAD=triton.next_power_of_2(ids.shape[1]), BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=warps, **overlap(h.device))
    return act


def launch_down(act: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, down: torch.Tensor,
                tile=None) -> torch.Tensor:
    """The down kernel: (B, k, H) weighted products ``w_k * (act_k @ down_k^T)`` of every pair."""
    triton, _, _, down_kernel, _ = _kernels()
    block_n, block_k, warps = tile or DOWN_TILE
    (b, k), hidden = ids.shape, down.shape[1]
    out = torch.empty(b, k, hidden, dtype=act.dtype, device=act.device)
    with on_device(act.device):
        down_kernel[(b * k, triton.cdiv(hidden, block_n))](
            act, weights, down, ids, out, hidden, down.shape[2], down.stride(0), down.stride(1),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **overlap(act.device))
    return out


def launch_down_sum(act: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, down: torch.Tensor,
                    residual: torch.Tensor, tile=None) -> torch.Tensor:
    """The down_sum kernel: (B, H) ``residual + sum_k w_k * (act_k @ down_k^T)``, rounded as :func:`experts` and the
    decoder's residual add round it."""
    triton, *_, down_sum_kernel = _kernels()
    block_n, block_k, warps = tile or DOWN_SUM_TILE
    (b, k), hidden = ids.shape, down.shape[1]
    out = torch.empty(b, hidden, dtype=act.dtype, device=act.device)
    with on_device(act.device):
        down_sum_kernel[(b, triton.cdiv(hidden, block_n))](
            act, weights, down, ids, residual, out, hidden, down.shape[2], down.stride(0), down.stride(1),
            residual.stride(0), TOP_K=k, TOP_K_PAD=triton.next_power_of_2(k), BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, **overlap(act.device))
    return out


def _runs(h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    return available(h.device) and gate_up.stride(-1) == 1 and down.stride(-1) == 1


def _plain_input(h, norm, eps):
    if norm is None:
        return h
    from qvl.infer.decode import rms_norm

    return rms_norm(h, norm, eps)


@torch.library.custom_op("qvl::moe_experts_added", mutates_args=())
def experts_added(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor | None = None,
                  eps: float = 0.0) -> torch.Tensor:
    """``residual + experts(h, ...)`` (B, H): the gate_up kernel, then the down_sum kernel summing each row's k
    products and adding the residual. ``norm``: as :func:`expert_outputs`."""
    if not _runs(h, gate_up, down) or residual.stride(-1) != 1 or residual.dtype != h.dtype:
        y = _plain_expert_outputs(_plain_input(h, norm, eps), weights, ids, gate_up, down)
        return (residual + y.float().sum(dim=1).to(h.dtype)).to(h.dtype)
    h, weights, ids = h.contiguous(), weights.contiguous(), ids.contiguous()
    act = launch_gate_up(h, ids, gate_up, norm=norm, eps=eps)
    return launch_down_sum(act, weights, ids, down, residual)


@experts_added.register_fake
def _(h, weights, ids, gate_up, down, residual, norm=None, eps=0.0):
    return residual.new_empty(residual.shape, dtype=h.dtype)


@torch.library.custom_op("qvl::moe_expert_outputs", mutates_args=())
def expert_outputs(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """Each routed expert's weighted output for each row: h (B, H), weights / ids (B, k), gate_up (E, 2I, H), down
    (E, H, I) -> (B, k, H), in h's dtype. ``norm`` (H,): h is the layer's residual, RMS-normalised (``eps``) and
    scaled by it first, inside the gate_up kernel (as qvl.infer.decode.rms_norm computes it)."""
    if not _runs(h, gate_up, down):
        return _plain_expert_outputs(_plain_input(h, norm, eps), weights, ids, gate_up, down)
    h, weights, ids = h.contiguous(), weights.contiguous(), ids.contiguous()
    return launch_down(launch_gate_up(h, ids, gate_up, norm=norm, eps=eps), weights, ids, down)


@expert_outputs.register_fake
def _(h, weights, ids, gate_up, down, norm=None, eps=0.0):
    return h.new_empty(ids.shape[0], ids.shape[1], h.shape[1])


def experts(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts' weighted sum for each row: h (B, H), weights / ids (B, k), gate_up (E, 2I, H), down
    (E, H, I) -> (B, H); the k-sum in float32, as the plain path sums. ``norm``: as :func:`expert_outputs`.
    ``residual`` (B, H): added to the sum, by the down_sum kernel where :data:`SUM_IN_DOWN`."""
    if residual is not None and SUM_IN_DOWN:
        return experts_added(h, weights, ids, gate_up, down, residual, norm, eps)
    y = expert_outputs(h, weights, ids, gate_up, down, norm, eps).float().sum(dim=1).to(h.dtype)
    return y if residual is None else residual + y


@torch.library.custom_op("qvl::moe_routed_outputs", mutates_args=())
def routed_outputs(h: torch.Tensor, logits: torch.Tensor, top_k: int, gate_up: torch.Tensor, down: torch.Tensor,
                   norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """:func:`route` and :func:`expert_outputs` in two kernels: the gate_up kernel takes each row's top-k from its
    router ``logits`` (B, E) itself, so no route kernel runs between the router and the experts. -> (B, k, H)."""
    if not _runs(h, gate_up, down) or logits.shape[-1] & (logits.shape[-1] - 1):
        weights, ids = _plain_route(logits, top_k)
        return _plain_expert_outputs(_plain_input(h, norm, eps), weights, ids, gate_up, down)
    h, logits = h.contiguous(), logits.contiguous()
    ids = torch.empty(h.shape[0], top_k, dtype=torch.int64, device=h.device)
    weights = torch.empty(h.shape[0], top_k, dtype=logits.dtype, device=h.device)
    act = launch_gate_up(h, ids, gate_up, norm=norm, eps=eps, logits=logits, weights=weights)
    return launch_down(act, weights, ids, down)


@routed_outputs.register_fake
def _(h, logits, top_k, gate_up, down, norm=None, eps=0.0):
    return h.new_empty(h.shape[0], top_k, h.shape[1])


def routed_experts(h: torch.Tensor, logits: torch.Tensor, top_k: int, gate_up: torch.Tensor, down: torch.Tensor,
                   norm: torch.Tensor | None = None, eps: float = 0.0,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE layer after its router: each row's top-k of ``logits`` (B, E), then :func:`experts` over them; where
    :data:`ROUTE_IN_GATE_UP` (and the residual is not summed in the down kernel) the top-k is taken inside the
    gate_up kernel (:func:`routed_outputs`), else by :func:`route` before it."""
    power_of_two = not logits.shape[-1] & (logits.shape[-1] - 1)  # the kernel's tl.arange over the experts
    if not ROUTE_IN_GATE_UP or (residual is not None and SUM_IN_DOWN) or not power_of_two:
        return experts(h, *route(logits, top_k), gate_up, down, norm, eps, residual)
    y = routed_outputs(h, logits, top_k, gate_up, down, norm, eps).float().sum(dim=1).to(h.dtype)
    return y if residual is None else residual + y
