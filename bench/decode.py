"""Generation speed on one GPU: plain generate vs transformers' static cache + compile vs qvl's engine.

All in one process, on the same random-weight model (official 8B shape by default, ``--size 30B-A3B`` for the
mixture-of-experts one; bf16, sdpa):

  * bandwidth: a device-to-device copy (bytes read + written / time), and the bytes of weights one
    decode step reads (every LLM matrix and norm + lm_head; the embedding table is only indexed; of an MoE
    block the router and the top-k experts one token is routed to, not the others), giving the batch-1
    bound = bandwidth / bytes
  * batch 1: one 1024x1024 image + ~64 text tokens, N new tokens forced (EOS ignored):
    TTFT and decode tok/s for model.generate (dynamic cache), generate with
    cache_implementation="static" + CompileConfig(fullgraph=False), and qvl's engine
  * batch 32 (448x448 images, each its own, 128 new tokens): generate, static + compile, at a fixed batch
  * prefill alone (qvl's engine, no vision cache): one 1024x1024-image prompt, one 448x448 one and eight, as one
    packed row (the default: a compiled graph per layer), the same row in the decode step's pieces, and as
    transformers' forward over the padded batch, median ms of 5
  * a chat's follow-up turn (283 text tokens on top of the 1024x1024-image prompt's kept keys / values, as prefix
    reuse runs it) against that prompt's own prefill, median ms of 5; its layers as one graph each and as pieces
  * a prompt of nearly the whole context arriving while 8 requests decode, prefilled whole and 1,024 tokens a
    turn: the longest gap between the others' decode steps, and its own time to first token
  * qvl's scheduler with 8 and 32 concurrent requests arriving at staggered times
    (--stagger seconds apart): total output tok/s = all tokens / (last finish - first arrival),
    plus the decode-step times (a recompilation or capture would show as a stall)

    python bench/decode.py --json bench/results/decode.json
    python bench/decode.py --size 30B-A3B --skip compiled,batch32 --json bench/results/decode_moe_h100.json

MoE: the captured step is timed per step implementation and per way of running the routed experts (grouped
GEMM / gathered / fused: qvl.infer.moe_kernels' Triton kernels); the engine then gathers or fuses at the batch sizes
where that was faster. Kernel switches (overlapped launches; for MoE the router's top-k inside the gate_up kernel;
split attention merged by its own last programs) are timed off and on, and kept on only where never slower.
``qvl_vs_generate`` is the batch-1 decode speed over plain generate's; ``peak_vs_plan`` the peak allocated memory
over `qvl plan serve`'s (transformers, fast decode path, the engine's slots and context).

Partial results are written after each phase, so a run cut short still leaves numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import threading
import time

import torch


def copy_bandwidth(gib: float = 4.0) -> float:
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / reps
    del a, b
    return 2 * n * 2 / dt  # bytes read + written per second


def decode_weight_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: every language-model matrix and norm, and lm_head; of a sparse MoE
    block the router and the ``num_experts_per_tok`` experts the token is routed to (the experts' 3-D
    parameters hold one expert per leading index, all of one size). The embedding table is only indexed."""
    text = model.model.language_model
    top_k = getattr(text.config, "num_experts_per_tok", 0)
    total = 0
    for name, p in text.named_parameters():
        if "embed_tokens" in name:
            continue
        routed = ".mlp.experts." in name and p.dim() == 3
        total += (top_k * p[0].numel() if routed else p.numel()) * p.element_size()
    head = model.lm_head.weight
    return total + head.numel() * head.element_size()


def image(w: int, h: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def prompt(processor, w: int, h: int, words: int, seed: int = 0):
    from qvl.data.preprocess import encode
    from qvl.data.samples import Media, Message, Sample

    text = " ".join(["describe"] * words)
    return encode(Sample([Message("user", [Media("image", image(w, h, seed)), text])]), processor,
                  for_generation=True)


def hf_inputs(encs, processor, device):
    from qvl.data.collate import collate
    from qvl.models.tokens import token_ids

    batch = collate(encs, pad_id=token_ids(processor.tokenizer).pad, padding_side="left")
    return {k: (v.to(torch.bfloat16) if k.startswith("pixel_values") else v).to(device) for k, v in batch.items()}


def timed_generate(model, inputs, new: int, **kw) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def hf_phase(model, inputs, new: int, rows: int, **kw) -> dict:
    """TTFT (a 1-token generate) and decode tok/s ((new-1) tokens per row in the time beyond it)."""
    timed_generate(model, inputs, 2, **kw)  # warm-up (and compile, for the static cache)
    timed_generate(model, inputs, new, **kw)
    ttft = statistics.median(timed_generate(model, inputs, 1, **kw) for _ in range(3))
    full = timed_generate(model, inputs, new, **kw)
    return {"ttft_s": ttft, "decode_tok_s": rows * (new - 1) / (full - ttft), "total_tok_s": rows * new / full,
            "wall_s": full}


def engine_request(engine, enc_prompt, new: int):
    """A Prepared request for the engine (bypassing the chat template: the prompt is already encoded)."""
    from qvl.infer.engine import Prepared
    from qvl.infer.types import Request

    s = engine.sampling(temperature=0, presence_penalty=0, max_new_tokens=new, ignore_eos=True)
    return Prepared(Request([]), s, len(enc_prompt), enc_prompt)


def qvl_one(engine, enc, new: int) -> dict:
    times = []

    def on_chunk(c):
        times.append((time.perf_counter(), c))

    t0 = time.perf_counter()
    h = engine.submit(engine_request(engine, enc, new), on_chunk)
    while not times or times[-1][1].finish_reason is None:
        time.sleep(0.001)
    first = next(t for t, c in times if c.text or c.finish_reason)
    last = times[-1][0]
    n = times[-1][1].completion_tokens
    del h
    return {"ttft_s": first - t0, "decode_tok_s": (n - 1) / (last - first), "tokens": n}


def qvl_concurrent(engine, encs, new: int, stagger: float) -> dict:
    done = threading.Event()
    ends, counts = {}, {}

    def make(i):
        def on_chunk(c):
            if c.finish_reason is not None:
                ends[i] = time.perf_counter()
                counts[i] = c.completion_tokens
                if len(ends) == len(encs):
                    done.set()
        return on_chunk

    steps_before = len(engine.batcher.step_times)
    t0 = time.perf_counter()
    for i, enc in enumerate(encs):
        engine.submit(engine_request(engine, enc, new), make(i))
        if stagger:
            time.sleep(stagger)
    done.wait(600)
    wall = max(ends.values()) - t0
    steps = list(engine.batcher.step_times)[steps_before:]
    return {"requests": len(encs), "total_tokens": sum(counts.values()), "wall_s": wall,
            "total_tok_s": sum(counts.values()) / wall, "stagger_s": stagger,
            "step_ms_p50": 1e3 * statistics.median(steps) if steps else None,
            "step_ms_max": 1e3 * max(steps) if steps else None}


def fill_slots(decoder, rows: int, length: int, distinct: int | None = None) -> None:
    """``rows`` slots taken at ``length``, each fed its own random token (identical rows would route every token of a
    MoE step to the same experts, as at batch 1); ``distinct``: the rows' tokens drawn in turn from that many (rows
    with the same token route alike)."""
    for s in range(rows):
        decoder.busy.add(s)
        decoder.host_length[s] = length
    decoder.length[:rows] = length
    vocab = decoder.embed.shape[0]
    pool = torch.randint(0, vocab, (distinct or rows,), generator=torch.Generator().manual_seed(rows))
    tokens = pool[torch.arange(rows) % len(pool)]
    decoder.set_tokens(torch.arange(rows, device=decoder.device), tokens.to(decoder.device))


def step_logits(decoder, rows: int, length: int) -> torch.Tensor:
    """The logits of one captured step of :func:`fill_slots`'s rows: what two ways of running a step must agree on."""
    fill_slots(decoder, rows, length)
    logits = decoder.decode(rows)[:rows].clone()
    for s in range(rows):
        decoder.release(s)
    return logits


def graph_step_ms(decoder, rows: int, length: int, reps: int = 50, distinct: int | None = None) -> float:
    """Time of the captured decode step alone (no sampling, no host work) of :func:`fill_slots`'s rows."""
    fill_slots(decoder, rows, length, distinct)
    decoder.decode(rows)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        decoder.decode(rows)
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t) / reps
    for s in range(rows):
        decoder.release(s)
    return ms


def fused_rows_sweep(decoder, impl: str, rows: list[int], length: int) -> dict[int, dict[str, float]]:
    """The captured MoE step (``impl``) at each of ``rows`` with the fused (Triton) and the grouped experts, ms:
    where between 1 and all slots the fused kernels, which read each pair's expert whole, stop winning."""
    out = {}
    for kind in ("fused", "grouped"):
        decoder.set_impl(impl, kind)
        for r in rows:
            out.setdefault(r, {})[kind] = graph_step_ms(decoder, r, length)
    return out


def experts_overlap(decoder, impl: str, rows: int, length: int, distinct=(32, 8, 2, 1)) -> dict[int, dict[str, float]]:
    """The captured MoE step (``impl``) at ``rows`` rows whose tokens are drawn from each of ``distinct`` many, with
    the fused and the grouped experts, ms. Random weights route random tokens near uniformly, fused's best case;
    fewer distinct tokens route more rows alike, grouped's (each chosen expert read once): a trained model's rows lie
    between, so this brackets where its crossover can be."""
    out = {}
    for kind in ("fused", "grouped"):
        decoder.set_impl(impl, kind)
        for d in distinct:
            if d <= rows:
                out.setdefault(d, {})[kind] = graph_step_ms(decoder, rows, length, distinct=d)
    return out


def fused_rows_limit(sweep: dict[int, dict[str, float]]) -> int:
    """The most rows up to which the fused experts were never slower than the grouped ones (1: they won at 1 row,
    where the sweep starts from)."""
    limit = 1
    for rows in sorted(sweep):
        if sweep[rows]["fused"] > sweep[rows]["grouped"]:
            break
        limit = rows
    return limit


def timed_ways(decoder, ways, switch, shapes) -> tuple[dict, str | None]:
    """The captured step each of ``ways`` makes (``switch(way)`` sets it), ms at each ``(name, rows, keys)`` of
    ``shapes``; a way that fails is left out: -> (timings by way, the last failure or None)."""
    timed, failed = {}, None
    for way in ways:
        try:
            switch(way)
            timed[way] = {name: graph_step_ms(decoder, rows, keys) for name, rows, keys in shapes}
        except Exception as e:  # noqa: BLE001 -- recorded by the caller; the run goes on
            failed = f"{way}: {type(e).__name__}: {str(e)[:300]}"
            for slot in list(decoder.busy):  # the rows graph_step_ms had taken
                decoder.release(slot)
    return timed, failed


def attention_choice(decoder, impl: str, long_keys: int) -> dict:
    """The captured step (``impl``, the experts as "auto" runs them) with plain and with split-key attention
    (qvl.infer.attend_kernels), at 1 row x ``long_keys`` and 32 rows x 300: the decoder keeps split where it was
    never slower. -> the results' keys."""
    if not decoder._split_ok:
        return {"attention": "plain", "attention_failed": "the split-key kernel does not run here (no Triton, or "
                                                          "the heads' width or dtype)"}
    timed, failed = timed_ways(decoder, ("plain", "split"),
                               lambda way: decoder.set_impl(impl, "auto" if decoder.is_moe else None, way),
                               [("rows1_len1100", 1, long_keys), ("rows32_len300", 32, 300)])
    res = {"attention_failed": failed} if failed else {}  # plain attention stays
    if not decoder._split_ok:  # a capture fell back: the "split" timings were plain ones
        timed.pop("split", None)
        res["attention_failed"] = "split-key attention failed to compile or capture (the decoder attended plainly)"
    if "split" in timed:  # the chunks' size: how many programs a multiprocessor the split-key step is given
        res["attention_split_programs_per_sm"] = split_programs_sweep(decoder, impl, long_keys)
    won = "split" in timed and "plain" in timed and all(timed["split"][k] <= timed["plain"][k] for k in timed["plain"])
    decoder.set_impl(impl, None, "split" if won else "plain")
    attends = "split" if decoder._split_attention() else "plain"  # a capture that fell back attends plainly
    print("attention", timed, "->", attends, flush=True)
    return {**res, "attention_ms": timed, "attention": attends}


def projections_choice(decoder, impl: str, long_keys: int) -> dict:
    """The captured 1-row step (``impl``, ``long_keys`` keys) with its projections each way of
    qvl.infer.decode.PROJECTIONS_WAYS (cuBLAS; qvl.infer.gemv_kernels' kernel; that kernel with the norms, residual
    adds and q/k RoPE + cache write folded in): the decoder keeps the fastest (a kernel way on a tie). A way whose
    capture fell back to cuBLAS is reported as such, not timed. -> the results' keys."""
    from qvl.infer import gemv_kernels
    from qvl.infer.decode import PROJECTIONS_WAYS

    if not gemv_kernels.available(decoder.device):
        return {"projections": "cublas", "projections_failed": "the GEMV kernel does not run here (no Triton)"}
    timed, failures = {}, []
    for way in PROJECTIONS_WAYS:
        decoder._gemv_ok = decoder._fold_ok = True  # an earlier capture (another way's) may have turned them off
        got, failed = timed_ways(decoder, (way,), lambda w: decoder.set_impl(impl, None, None, w),
                                 [("rows1_len1100", 1, long_keys)])
        if failed:
            failures.append(failed)
        elif decoder._projections_for(1) != way:  # a capture fell back: its timings were another way's
            failures.append(f"{way}: failed to compile or capture (the decoder used {decoder._projections_for(1)})")
        else:
            timed.update(got)
    decoder._gemv_ok = decoder._fold_ok = True
    preferred = sorted(timed, key=lambda w: (max(timed[w].values()), w == "cublas", w == "gemv"))
    decoder.set_impl(impl, None, None, preferred[0] if preferred else "cublas")
    print("projections", timed, "->", decoder.projections, flush=True)
    res = {"projections_failed": "; ".join(failures)} if failures else {}
    return {**res, "projections_ms": timed, "projections": decoder.projections}


def overlap_choice(decoder, impl: str, long_keys: int) -> dict:
    """The captured step (``impl``, as chosen so far) at 1 row x ``long_keys`` and 32 rows x 300 with its Triton
    kernels launched one after another ("serial") and overlapped (programmatic dependent launch,
    qvl.infer.triton_support.LAUNCH_OVERLAP). Overlapping changes no arithmetic: the two ways' logits must be equal
    (a difference would be a kernel reading before its predecessor ended), three steps of each shape compared; equal
    logits show no race in those steps, not that none can happen (tests/infer/test_gemv_kernels.py reasons the order
    out per kernel). The decoder keeps overlapping where the logits were equal and it was never slower. -> the
    results' keys."""
    from qvl.infer import triton_support

    if not triton_support.overlap(decoder.device)["PDL"]:
        before, triton_support.LAUNCH_OVERLAP = triton_support.LAUNCH_OVERLAP, True  # off: does the card take it?
        if not triton_support.overlap(decoder.device)["PDL"]:
            triton_support.LAUNCH_OVERLAP = before
            return {"launch_overlap": "serial", "launch_overlap_failed": "no programmatic dependent launch here (a "
                                                                        "card before Hopper, or Triton before 3.4)"}
    shapes = [("rows1_len1100", 1, long_keys), ("rows32_len300", 32, 300)]

    def switch(way):
        decoder._overlap_ok = way == "overlapped"
        decoder.set_impl(impl)  # its graphs go: the next captures launch the new way

    timed, failed = timed_ways(decoder, ("serial", "overlapped"), switch, shapes)
    res = {"launch_overlap_failed": failed} if failed else {}
    if "overlapped" in timed and not decoder._overlap_ok:  # a capture fell back: those were serial timings
        timed.pop("overlapped")
        res["launch_overlap_failed"] = "overlapped launches failed to capture (the decoder launched serially)"
    same = None
    if len(timed) == 2:
        logits = {}
        for way in timed:
            switch(way)
            logits[way] = [step_logits(decoder, rows, keys) for _, rows, keys in shapes for _ in range(3)]
        same = all(torch.equal(a, b) for a, b in zip(logits["serial"], logits["overlapped"]))
        res["launch_overlap_max_abs_diff"] = max((a.float() - b.float()).abs().max().item()
                                                 for a, b in zip(logits["serial"], logits["overlapped"]))
    won = same and all(timed["overlapped"][k] <= timed["serial"][k] for k in timed["serial"])
    switch("overlapped" if won else "serial")
    print("launches", timed, {True: "same logits", False: "LOGITS DIFFER", None: ""}[same], "->",
          "overlapped" if won else "serial", flush=True)
    return {**res, "launch_overlap_ms": timed, "launch_overlap_same_logits": same,
            "launch_overlap": "overlapped" if won else "serial"}


def switch_choice(decoder, impl: str, key: str, ways: tuple[str, str], turn_on, shapes, runs_it) -> dict:
    """The captured step (``impl``) at each ``(name, rows, keys)`` of ``shapes`` with a kernel switch off and on
    (``ways``: their names; ``turn_on(bool)`` sets it), and the largest difference of their logits (the same values,
    possibly summed in another order). ``runs_it()``: whether the step still runs the kernel the switch is in (a
    capture that fell back does not: its timings are left out). The decoder keeps the switch on where it was never
    slower. -> the results' keys, under ``key``."""
    def switch(way):
        turn_on(way == ways[1])
        decoder.set_impl(impl)  # its graphs go: the next captures run the new way

    timed, failed = timed_ways(decoder, ways, switch, shapes)
    if not runs_it():  # a capture fell back during the timings: they were of another path
        timed, failed = {}, f"a capture fell back from the kernel {key} switches (timings left out)"
    res = {f"{key}_failed": failed} if failed else {}
    if len(timed) == 2:
        try:
            logits = {way: [] for way in ways}
            for way in ways:
                switch(way)
                logits[way] = [step_logits(decoder, rows, keys) for _, rows, keys in shapes]
            res[f"{key}_max_abs_diff"] = max((a.float() - b.float()).abs().max().item()
                                             for a, b in zip(*logits.values()))
        except Exception as e:  # noqa: BLE001 -- recorded; the timings stand
            res[f"{key}_failed"] = f"logits: {type(e).__name__}: {str(e)[:300]}"
            for slot in list(decoder.busy):
                decoder.release(slot)
    won = ways[1] in timed and all(timed[ways[1]][k] <= timed.get(ways[0], timed[ways[1]])[k]
                                   for k in timed[ways[1]])
    switch(ways[1] if won else ways[0])
    print(key, timed, res, "->", ways[1] if won else ways[0], flush=True)
    return {**res, f"{key}_ms": timed, key: ways[1] if won else ways[0]}

def route_choice(decoder, impl: str, long_keys: int) -> dict:
    """MoE with fused experts: the router's top-k in its own kernel or inside the gate_up kernel
    (qvl.infer.moe_kernels.ROUTE_IN_GATE_UP), at 1 row x ``long_keys`` and 8 rows x 300 (:func:`switch_choice`)."""
    from qvl.infer import moe_kernels

    if not (decoder.is_moe and decoder._experts_for(1) == "fused"):
        return {}
    many = min(8, decoder.slots, decoder.fused_max_rows)  # only steps whose experts run fused
    shapes = [("rows1_len1100", 1, long_keys)] + ([(f"rows{many}_len300", many, 300)] if many > 1 else [])
    return switch_choice(decoder, impl, "route", ("route_kernel", "in_gate_up"),
                         lambda on: setattr(moe_kernels, "ROUTE_IN_GATE_UP", on), shapes,
                         lambda: decoder._experts_for(1) == "fused")


def merge_choice(decoder, impl: str, long_keys: int) -> dict:
    """Split-key attention: its chunks merged by a second kernel or by the split kernel's last program
    (qvl.infer.attend_kernels.MERGE_IN_SPLIT), at 1 row x ``long_keys`` and 32 rows x 300 (:func:`switch_choice`)."""
    from qvl.infer import attend_kernels

    if not decoder._split_attention():
        return {}
    return switch_choice(decoder, impl, "merge", ("merge_kernel", "in_split"),
                         lambda on: setattr(attend_kernels, "MERGE_IN_SPLIT", on),
                         [("rows1_len1100", 1, long_keys), ("rows32_len300", min(32, decoder.slots), 300)],
                         decoder._split_attention)

def split_programs_sweep(decoder, impl: str, long_keys: int, per_sm=(1, 2, 4, 8)) -> dict:
    """The captured step with split-key attention whose chunks (qvl.infer.attend_kernels.chunk_for) make each of
    ``per_sm`` programs a multiprocessor, ms, at 1 row x ``long_keys`` and 32 rows x 300, with the chunk each got:
    the data to set PROGRAMS_PER_SM by. The default is restored after."""
    from qvl.infer import attend_kernels as ak

    kept, out = ak.PROGRAMS_PER_SM, {}
    try:
        sms = ak._multiprocessors(decoder.device)
        for n in per_sm:
            ak.PROGRAMS_PER_SM = n
            decoder.set_impl(impl, "auto" if decoder.is_moe else None, "split")  # captured again, with these chunks
            out[n] = {"rows1_len1100": graph_step_ms(decoder, 1, long_keys),
                      "rows32_len300": graph_step_ms(decoder, 32, 300),
                      "chunks": [ak.chunk_for(1, decoder.n_kv, long_keys, sms), ak.chunk_for(32, decoder.n_kv, 300, sms)]}
            if not decoder._split_ok:  # a capture fell back: those were plain timings; these chunks' failure only
                out[n] = {"failed": "split-key attention failed to compile or capture with these chunks"}
                decoder._split_ok = True
    except Exception as e:  # noqa: BLE001 -- recorded; the timings above stand
        out["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
        for slot in list(decoder.busy):
            decoder.release(slot)
    finally:
        ak.PROGRAMS_PER_SM = kept
    return out


def long_prompt_stall(engine, encs, long_enc, part_tokens: int, new: int) -> dict:
    """``encs`` decoding (``new`` tokens each), then ``long_enc`` arriving 0.3 s later, prefilled whole
    (``part_tokens`` 0) or ``part_tokens`` a turn: the longest gap between the others' decode steps meanwhile, and
    the long prompt's time to its first token."""
    b = engine.batcher
    kept, b.prefill_part_tokens = b.prefill_part_tokens, part_tokens
    first, done = {}, threading.Event()

    def on_chunk(c):
        first.setdefault("t", time.perf_counter())
        if c.finish_reason is not None:
            done.set()

    try:
        before = len(b.step_times)
        handles = [engine.submit(engine_request(engine, e, new)) for e in encs]
        time.sleep(0.3)
        t0 = time.perf_counter()
        engine.submit(engine_request(engine, long_enc, 4), on_chunk)
        done.wait(600)
        for h in handles:
            h.result()
        gaps = list(b.step_times)[before:]
    finally:
        b.prefill_part_tokens = kept
    return {"part_tokens": part_tokens, "long_prompt_tokens": len(long_enc), "long_ttft_s": first["t"] - t0,
            "step_gap_ms_max": 1e3 * max(gaps), "step_gap_ms_p50": 1e3 * statistics.median(gaps)}


def prefill_ms(engine, encs, impl: str, reps: int = 5, profile: str | None = None) -> float:
    """Median time of one prefill of ``encs`` into the first slots by ``impl``: "packed" (one unpadded row, a
    compiled graph per layer: qvl.infer.packed_prefill, the default), "packed-pieces" (the same row, each layer the
    decode step's pieces with the cache writes and the attention eager between them) or "padded" (transformers'
    forward over the padded batch); the vision cache left out, so every run encodes its images. ``profile``: a
    kernel table of one more run written there (untimed)."""
    from types import SimpleNamespace

    from qvl.data.packing import sample_positions
    from qvl.infer import packed_prefill

    b = engine.batcher
    d, slots = b.decoder, list(range(len(encs)))
    positions = [sample_positions(e, engine.rope_index) for e in encs]
    jobs = [SimpleNamespace(prepared=SimpleNamespace(inputs=e, media_keys=None)) for e in encs]
    kept, b.vision_cache = b.vision_cache, None
    layers, d.prefill_layers = d.prefill_layers, ("pieces" if impl == "packed-pieces" else "whole")
    times = []
    try:
        for i in range(reps + 1 + bool(profile)):  # the first run meets the shapes; a profiled one comes last
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.profiler.profile() if profile and i == reps + 1 else contextlib.nullcontext() as prof:
                if impl.startswith("packed"):
                    packed_prefill.prefill(d, slots, encs, positions)
                else:
                    b._prefill_padded(slots, jobs, positions)
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t))
            for s in slots:
                d.release(s)
        if profile:
            write_profile(prof, profile)
            times.pop()
    finally:
        b.vision_cache, d.prefill_layers = kept, layers
    return statistics.median(times[1:])


def write_profile(prof, path: str) -> None:
    """A profile's kernel table by device time, then by host time."""
    with open(path, "w") as f:
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            f.write(prof.key_averages().table(sort_by=key, row_limit=30) + "\n\n")


def followup_ms(engine, enc, new_tokens: int = 283, reps: int = 5, profile: str | None = None,
                layers: str = "whole") -> dict:
    """A chat's turn 2 in the engine: ``enc`` (one 1024x1024-image prompt) prefilled packed into slot 0, then
    ``new_tokens`` more text tokens (turn 1's answer and a question: 283 in bench/serve.py's conversation) run on top of
    its kept keys / values (qvl.infer.packed_prefill.rest, what prefix reuse runs). Median ms of each (``reps``, a
    different length each time as a chat's are), the layers run as ``layers`` says (``DecodeModel.prefill_layers``);
    ``profile``: a kernel table of one follow-up written there."""
    import dataclasses

    from qvl.data.packing import sample_positions
    from qvl.infer import packed_prefill

    d = engine.batcher.decoder
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    kept, d.prefill_layers = d.prefill_layers, layers
    times = {"prompt": [], "followup": []}
    text = enc.input_ids[enc.mm_token_type_ids == 0]  # the follow-up's tokens: the prompt's text, repeated
    for i in range(reps + 1 + bool(profile)):  # the first run meets the shapes; a profiled one comes last, untimed
        n = new_tokens + 4 * i
        rest = text.repeat(n // len(text) + 1)[:n]
        follow = dataclasses.replace(enc, input_ids=torch.cat([enc.input_ids, rest]), labels=None,
                                     mm_token_type_ids=torch.cat([enc.mm_token_type_ids, torch.zeros_like(rest)]))
        positions = sample_positions(follow, engine.rope_index)
        sync()
        t = time.perf_counter()
        packed_prefill.prefill(d, [0], [enc], [positions[:, :len(enc)]])
        sync()
        t_prompt = time.perf_counter()
        profiled = profile and i == reps + 1
        with torch.profiler.profile() if profiled else contextlib.nullcontext() as prof:
            packed_prefill.rest(d, 0, len(enc), follow, positions)
            sync()
        if not profiled:
            times["prompt"].append(1e3 * (t_prompt - t))
            times["followup"].append(1e3 * (time.perf_counter() - t_prompt))
        d.release(0)
        if profiled:
            write_profile(prof, profile)
    d.prefill_layers = kept
    out = {k: statistics.median(v[1:]) for k, v in times.items()}
    out.update(prompt_tokens=len(enc), new_tokens=new_tokens, followup_over_prompt=out["followup"] / out["prompt"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8B")
    ap.add_argument("--new", type=int, default=256, help="new tokens at batch 1")
    ap.add_argument("--baseline-new", type=int, default=64, help="new tokens for plain generate at batch 1 (slow)")
    ap.add_argument("--batch-new", type=int, default=128)
    ap.add_argument("--stagger", type=float, default=0.02, help="seconds between arrivals")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: baseline,compiled,batch32,prefill,followup,parts,qvl")
    ap.add_argument("--max-model-len", type=int, default=4096, help="the engine's context (its slot cache)")
    ap.add_argument("--json", default="decode.json")
    ap.add_argument("--profile", help="write a profile of one 8-request prefill here")
    ap.add_argument("--profile-prefill", help="write profiles of the 1024x1024-image prompt's prefill, each way, "
                    "to FILE.<way>.txt")
    ap.add_argument("--profile-followup", help="write a profile of one follow-up turn's prefill (prefix reuse) here")
    ap.add_argument("--profile-step", help="write profiles of the captured decode step, 1 and 32 rows, here (their kernels)")
    args = ap.parse_args()
    # Every step variant this bench compares (pieces / layer, three ways to run the experts, two attentions, 1 and
    # n rows) is another compile of the same functions: past dynamo's default limit of 8 a variant runs uncompiled
    # and its timings are of eager code (the 30B-A3B run of 2026-12-06 met the limit timing attention). The engine compiles
    # only its own choice: one way per batch bucket, 1 row apart from the rest (dynamic shapes specialise 1).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    skip = set(filter(None, args.skip.split(",")))
    from qvl.infer import triton_support
    from qvl.models.build import random_model

    import datetime

    import transformers
    from provenance import source_tree

    out: dict = {"benchmark": "bench/decode.py", "card": torch.cuda.get_device_name(0),
                 "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "qvl_src_tree": source_tree()}}

    def save():
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)

    t = time.time()
    model, processor = random_model(args.size, dtype=torch.bfloat16, device="cuda")
    model.config._attn_implementation = "sdpa"
    model.eval()
    out["model"] = f"Qwen3-VL-{args.size} shape, random bf16 weights, sdpa"
    print(f"built {args.size} in {time.time() - t:.0f}s", flush=True)
    bw = copy_bandwidth()
    wbytes = decode_weight_bytes(model)
    out.update({"copy_bandwidth_tb_s": bw / 1e12, "decode_weight_gb": wbytes / 1e9,
                "bandwidth_bound_tok_s": bw / wbytes})
    big = prompt(processor, 1024, 1024, 60)
    # each its own image, as bench/serve.py's clients: identical prompts decode identical tokens, whose MoE rows all
    # route to the same experts (32 at once: 20.6 ms a fused step against 9.5 grouped, H100, 2026-12-06,
    # bench/results/decode_moe_fused_down_h100.json), which requests from different users do not
    small = [prompt(processor, 448, 448, 20 + i % 7, seed=1 + i) for i in range(32)]
    out["prompt_tokens_batch1"] = len(big)
    out["prompt_tokens_batch32"] = statistics.mean(len(e) for e in small)
    print(json.dumps(out), flush=True)
    save()

    one = hf_inputs([big], processor, "cuda")
    b32 = hf_inputs(small, processor, "cuda")
    with torch.inference_mode():
        if "baseline" not in skip:
            r = hf_phase(model, one, args.baseline_new, 1)
            out["baseline"] = r
            out["baseline_decode_tok_s"] = r["decode_tok_s"]
            out["baseline_ttft_s"] = r["ttft_s"]
            print("baseline", r, flush=True)
            save()
        if "batch32" not in skip:
            r = hf_phase(model, b32, args.batch_new, 32)
            out["baseline_batch32"] = r
            print("baseline batch32", r, flush=True)
            save()
        if "compiled" not in skip:
            from transformers import CompileConfig

            kw = {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=False)}
            t = time.time()
            r = hf_phase(model, one, args.new, 1, **kw)
            r["first_compile_s"] = time.time() - t
            out["hf_compiled"] = r
            out["hf_compiled_decode_tok_s"] = r["decode_tok_s"]
            print("hf compiled", r, flush=True)
            save()
            if "batch32" not in skip:
                r = hf_phase(model, b32, args.batch_new, 32, **kw)
                out["hf_compiled_batch32"] = r
                out["hf_compiled_batch32_tok_s"] = r["total_tok_s"]
                print("hf compiled batch32", r, flush=True)
                save()
    torch._dynamo.reset()  # drop the compiled generate (it holds the old weight tensors)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # peak_gib below is the qvl engine's, not the baselines'
    if "qvl" in skip:
        return 0

    from qvl.infer.transformers_backend import TransformersEngine

    t = time.time()
    engine = TransformersEngine(model, processor, name="bench", max_model_len=args.max_model_len, max_batch_size=32,
                                fast=True, say=print)
    d = engine.batcher.decoder
    d.warmup(max_keys=len(big) + args.new + 16)
    out["qvl_warmup_s"] = time.time() - t
    out["qvl_slots"], out["qvl_cache_len"] = engine.max_batch_size, engine.max_model_len
    print(f"qvl engine ready in {out['qvl_warmup_s']:.0f}s", flush=True)
    if "prefill" not in skip:  # the engine's two ways to prefill, same prompts, same call
        rows = {}
        for name, encs in (("1x1024", [big]), ("1x448", small[:1]), ("8x448", small[:8])):
            rows[name] = {impl: prefill_ms(engine, encs, impl, profile=args.profile_prefill and name == "1x1024"
                                           and f"{args.profile_prefill}.{impl}.txt")
                          for impl in ("padded", "packed-pieces", "packed")}
            for other in ("padded", "packed-pieces"):
                rows[name][f"{other}_over_packed"] = rows[name][other] / rows[name]["packed"]
            print(f"prefill {name}: {rows[name]}", flush=True)
        out["prefill_ms"] = rows
        save()
    if "followup" not in skip:  # a chat's turn 2 on top of turn 1's kept prompt (prefix reuse), against turn 1's
        # each layer one compiled graph (the default) against the pieces, same prompt, same call
        out["followup_ms_pieces"] = followup_ms(engine, big, layers="pieces")
        out["followup_ms"] = followup_ms(engine, big, profile=args.profile_followup)
        out["followup_pieces_over_whole"] = out["followup_ms_pieces"]["followup"] / out["followup_ms"]["followup"]
        print(f"follow-up turn: {out['followup_ms']}; the pieces {out['followup_ms_pieces']} "
              f"({out['followup_pieces_over_whole']:.2f}x)", flush=True)
        save()
    steps, failed = {}, {}
    # the captured step alone, per implementation (a failure skips it); MoE: per way of running the experts, in each
    # step implementation (three pieces a layer: 7.15 ms a batch-1 step grouped, 28 % of the bound, H100, 2026-12-05,
    # bench/results/decode_moe_h100.json; one function a layer has fewer kernels and launches)
    # fused: the Triton router top-k and experts (qvl.infer.moe_kernels), where they run
    kinds = ("grouped", "gathered", "fused") if d._fused_ok else ("grouped", "gathered")
    variants = ([(i, e) for i in ("pieces", "layer") for e in kinds] if d.is_moe
                else [("pieces", None), ("layer", None)])
    # a variant whose grouped experts fail to capture switches the decoder to gathering (and the prefill to padded)
    # for good: each variant starts from the same state, so one's failure does not change the others' timings
    fallbacks = ("_grouped_ok", "_fused_ok", "prefill_impl", "prefill_why_padded")
    start = {name: getattr(d, name) for name in fallbacks}
    for impl, experts in variants:
        key = impl + (f"/{experts}" if experts else "")
        for name, value in start.items():
            setattr(d, name, value)
        try:
            d.set_impl(impl, experts)
            steps[key] = {"rows1_len1100": graph_step_ms(d, 1, len(big)),
                          "rows32_len300": graph_step_ms(d, 32, 300)}
            if experts == "grouped" and not d._grouped_ok:  # the decoder fell back: these were gathered timings
                del steps[key]
                failed[key] = "grouped-GEMM experts failed to compile or capture (the decoder gathered them)"
            if experts == "fused" and not d._fused_ok:  # the same: grouped timings
                del steps[key]
                failed[key] = "fused (Triton) experts failed to compile or capture (the decoder grouped them)"
        except Exception as e:  # noqa: BLE001 -- recorded in the results, the run goes on
            failed[key] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"step implementation {key} failed: {failed[key]}", flush=True)
    out["graph_step_ms"], out["graph_step_failed"] = steps, failed
    best = min(steps, key=lambda k: steps[k]["rows1_len1100"])
    for name, value in start.items():  # the chosen variant's state: its grouped experts captured, or it gathered
        setattr(d, name, value)
    if failed.get(f"{best.split('/')[0]}/grouped", "").startswith("grouped-GEMM"):
        d._grouped_ok = False
    if failed.get(f"{best.split('/')[0]}/fused", "").startswith("fused"):
        d._fused_ok = False
    if d.is_moe:  # gather or fuse the experts at the batch sizes where that was faster, grouped GEMM elsewhere
        impl = best.split("/")[0]
        timed = {e: steps[f"{impl}/{e}"] for e in kinds if f"{impl}/{e}" in steps}

        def fastest(at: str):
            return min(timed, key=lambda e: timed[e][at]) if timed else None

        def rows_won(kind):  # every batch where it was fastest at 32 rows and (fused: checked first) at 1 row, else 1
            at_one = fastest("rows1_len1100") == kind  # where it was fastest at 1 row, else 0
            at_32 = fastest("rows32_len300") == kind and (at_one or kind != "fused")
            return d.slots if at_32 else int(at_one)

        d.gather_max_rows, d.fused_max_rows = rows_won("gathered"), rows_won("fused")
        # fused won at 1 row, grouped ran too (not gathering): up to how many rows? Every batch size, and at 32 rows
        # routed more or less alike (experts_overlap)
        if "grouped" in timed and d.fused_max_rows >= 1 and d.gather_max_rows <= 1:
            before = {name: getattr(d, name) for name in fallbacks}
            try:
                sweep = fused_rows_sweep(d, impl, [b for b in d.batch_buckets if 1 < b <= d.slots], 300)
                overlap = experts_overlap(d, impl, min(32, d.slots), 300)
                if d._fused_ok and d._grouped_ok:  # else a capture fell back and some timings were of another way
                    out["experts_rows_sweep"], out["experts_overlap"] = sweep, overlap
                    d.fused_max_rows = fused_rows_limit(sweep)
                else:
                    out["experts_rows_sweep_failed"] = "a capture fell back during the sweep: fused at 1 row only"
            except Exception as e:  # noqa: BLE001 -- recorded; the 1- and 32-row choice above stands
                out["experts_rows_sweep_failed"] = f"{type(e).__name__}: {str(e)[:300]}"
                for slot in list(d.busy):  # the rows graph_step_ms had taken
                    d.release(slot)
            for name, value in before.items():  # what the 1- and 32-row timings showed runs, whatever the sweep met
                setattr(d, name, value)
        out["experts_gather_max_rows"], out["experts_fused_max_rows"] = d.gather_max_rows, d.fused_max_rows
        out["experts_grouped_compiled"] = d._grouped_ok  # False: grouped GEMM failed, everything gathered
        out["experts_fused_ran"] = d._fused_ok  # False: no Triton, or its kernels failed
    attention = attention_choice(d, best.split("/")[0], len(big))  # split-key attention against plain
    out.update(attention)
    projections = projections_choice(d, best.split("/")[0], len(big))  # cuBLAS, the GEMV, the GEMV with folds
    out.update(projections)
    # the Triton kernels' launches overlapped or not; the timings before ran the way the process started with
    launched_before = "overlapped" if triton_support.overlap(d.device)["PDL"] else "serial"
    launches = overlap_choice(d, best.split("/")[0], len(big))
    out.update(launches)
    out.update(route_choice(d, best.split("/")[0], len(big)))  # MoE: the router's top-k in its kernel or in gate_up
    out.update(merge_choice(d, best.split("/")[0], len(big)))  # split attention merged in a kernel of its own or not
    d.set_impl(best.split("/")[0], "auto" if d.is_moe else None)
    d.warmup(max_keys=len(big) + args.new + 16)
    out["attention"] = "split" if d._split_attention() else "plain"  # a capture in the warm-up may have fallen back
    out["projections"] = d._projections_for(1)  # the same
    out["launch_overlap"] = "overlapped" if triton_support.overlap(d.device)["PDL"] else "serial"  # the same
    out["step_impl"] = best
    chosen = f"{best.split('/')[0]}/{d._experts_for(1)}"
    one_row_key = chosen if d.is_moe and chosen in steps else best  # what a batch-1 step runs after the choice above
    # the launches were timed with the attention and projections chosen before the warm-up, the projections with
    # that attention and the launches as they were then: each timing only where what it ran still holds
    same_attention = out["attention"] == attention.get("attention")
    same_launches = out["launch_overlap"] == launched_before
    timed_with = launches.get("launch_overlap_ms", {}).get(out["launch_overlap"]) \
        if same_attention and out["projections"] == projections.get("projections") else None
    if same_launches:
        timed_with = (timed_with or (projections.get("projections_ms", {}).get(out["projections"])
                                     if same_attention else None)
                      or attention.get("attention_ms", {}).get(out["attention"]))
    if (same_attention and out["projections"] == projections.get("projections")  # timed last, as the step runs now
            and out["launch_overlap"] == launches.get("launch_overlap", launched_before)):
        timed_with = (out.get("merge_ms", {}).get(out.get("merge")) or out.get("route_ms", {}).get(out.get("route"))
                      or timed_with)
    one_row = timed_with or steps[one_row_key]
    out["graph_only_decode_tok_s"] = 1e3 / one_row["rows1_len1100"]
    print("graph step", steps, "->", best, flush=True)
    save()
    if args.profile_step:  # where a captured step goes (1 and 32 rows): its kernels by device time, calls per 20 steps
        from torch.profiler import ProfilerActivity, profile

        tables = []
        # 32 rows too: how many clients at once cost more than one does (8B: 8.00 against 7.19 ms, H100,
        # 2026-12-06, graph_step_ms of bench/experiments/results/decode_8b_steps_h100.json), what bench/serve.py's
        # ``staggered_ceiling`` assumes away
        for rows, keys in ((1, len(big)), (32, 300)):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                graph_step_ms(d, rows, keys, reps=20)
            variant = best.split("/")[0] + (f"/{d._experts_for(rows)}" if d.is_moe else "")
            tables.append(f"{variant}, batch {rows} at {keys} tokens, 21 captured steps\n"
                          + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
        with open(args.profile_step, "w") as f:
            f.write("\n\n".join(tables))
    qvl_one(engine, big, 16)
    runs = [qvl_one(engine, big, args.new) for _ in range(3)]
    r = {"ttft_s": statistics.median(x["ttft_s"] for x in runs),
         "decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs)}
    out["qvl"] = r
    out["qvl_decode_tok_s"] = r["decode_tok_s"]
    out["qvl_ttft_s"] = r["ttft_s"]
    out["fraction_of_bound"] = r["decode_tok_s"] / out["bandwidth_bound_tok_s"]
    if "baseline_decode_tok_s" in out:
        out["qvl_vs_generate"] = r["decode_tok_s"] / out["baseline_decode_tok_s"]
    print(f"qvl batch 1: {r['decode_tok_s']:.0f} tok/s = {out['fraction_of_bound']:.0%} of the bandwidth bound "
          f"({out['bandwidth_bound_tok_s']:.0f} tok/s)", flush=True)
    print("qvl batch 1", r, flush=True)
    save()
    for n in (8, 32):
        before = len(engine.batcher.prefill_times)
        r = qvl_concurrent(engine, small[:n], args.batch_new, args.stagger)
        pf = list(engine.batcher.prefill_times)[before:]
        r["prefills"] = len(pf)
        r["prefill_s_total"] = sum(t for _, t in pf)
        out[f"concurrent_{n}"] = r
        out[f"concurrent_{n}_tok_s"] = r["total_tok_s"]
        print(f"qvl {n} concurrent", r, flush=True)
        save()
    r = qvl_concurrent(engine, small, args.batch_new, 0.0)
    out["concurrent_32_at_once"] = r
    print("qvl 32 at once", r, flush=True)
    if "parts" not in skip:  # a long prompt arriving while 8 others decode: prefilled whole, or a part per turn
        long_enc = prompt(processor, 448, 448, max(0, args.max_model_len - 700))  # ~tokens: words + image + template
        out["long_prompt"] = [long_prompt_stall(engine, small[:8], long_enc, part, args.batch_new)
                              for part in (0, 1024, 0)]  # whole again: the first may compile
        print("long prompt while 8 decode", out["long_prompt"], flush=True)
        save()
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    from types import SimpleNamespace

    from serve import planned_memory  # bench/serve.py: the plan of the fast decode path for these slots

    out.update(planned_memory(SimpleNamespace(model=args.size, max_model_len=engine.max_model_len,
                                              max_batch_size=engine.max_batch_size)))
    out["peak_vs_plan"] = out["peak_gib"] / out["plan_peak_allocated_gib"]
    save()
    if args.profile:  # where a prefill of 8 requests spends its time
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            qvl_concurrent(engine, small[:8], 2, 0.0)
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
        table += "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
        with open(args.profile, "w") as f:
            f.write(table)
    if "hf_compiled_decode_tok_s" in out:
        out["qvl_vs_hf_compiled"] = out["qvl_decode_tok_s"] / out["hf_compiled_decode_tok_s"]
    if "hf_compiled_batch32_tok_s" in out:
        out["concurrent_32_vs_hf_compiled_batch32"] = out["concurrent_32_tok_s"] / out["hf_compiled_batch32_tok_s"]
    save()
    print(json.dumps(out, indent=2))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
