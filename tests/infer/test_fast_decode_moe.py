"""The fast decode path on the tiny mixture-of-experts model (qwen3_vl_moe: 4 experts, 2 per token; CPU, eager).

Equivalence with the Hugging Face block: the router's weights and experts, and greedy tokens identical to
``model.generate`` for text and image prompts, alone and in a batch of rows of different lengths that join at
different steps; both expert implementations (grouped GEMM, gathered); the engine and `qvl serve`'s HTTP server
answering with generate's tokens.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qvl.data.samples import Media
from qvl.infer.decode import (EXPERTS_FUSED_MAX_ROWS, DecodeModel, experts_gathered, experts_grouped, router_top_k,
                              supports)
from qvl.infer.types import SamplingParams

from test_fast_decode import GREEDY, _Collect, _generate_ids, _job, _run_until_done  # noqa: E402

PROMPTS = {
    "text": ["describe the red circle in detail"],
    "image": [Media("image", Image.new("RGB", (96, 64), "blue")), "what shape is this?"],
    "short": ["hi"],
    "two_images": [Media("image", Image.new("RGB", (64, 64), "red")),
                   Media("image", Image.new("RGB", (32, 64), "green")), "compare the two pictures please"],
}


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """(model, processor, folder) of the tiny MoE checkpoint. Do not mutate: the module shares it."""
    from qvl.models.build import build_tiny
    from qvl.models.load import load

    out = tmp_path_factory.mktemp("models") / "tiny-moe"
    build_tiny(out, variant="moe")
    model, processor = load(out)
    return model, processor, out


def _batcher(model, processor, slots=4, experts="auto", compile=False, impl=None, attention=None, projections=None):
    from qvl.data.packing import rope_index_fn
    from qvl.infer.continuous import ContinuousBatcher
    from qvl.models.tokens import token_ids

    decoder = DecodeModel(model, slots=slots, max_len=512, compile=compile)
    decoder.set_impl(impl or decoder.impl, experts, attention, projections)
    return ContinuousBatcher(decoder, _Collect, token_ids(processor.tokenizer).pad, rope_index_fn(model),
                             coalesce_s=0.0)


def test_supported_and_every_layer_routed(tiny_moe):
    model, _, _ = tiny_moe
    assert supports(model) is None
    decoder = DecodeModel(model, slots=1, max_len=64)
    experts = [layer.mlp.experts for layer in model.model.language_model.layers]
    assert decoder.is_moe and [w.top_k for w in decoder.layers] == [2] * len(experts)
    for w, e in zip(decoder.layers, experts):  # the experts' own tensors: nothing copied
        assert w.mlp[1].data_ptr() == e.gate_up_proj.data_ptr() and w.mlp[2].data_ptr() == e.down_proj.data_ptr()
    assert decoder.prefill_impl == "packed"  # grouped experts over the prompts' tokens
    # compiled and not bf16 the experts run gathered, a copy of an expert per token: prompts go padded
    compiled = DecodeModel(model, slots=1, max_len=64, compile=True)
    assert compiled.prefill_impl == "padded" and "gathered" in compiled.prefill_why_padded


def test_unmerged_expert_adapters_fall_back_and_merged_ones_run(tiny_moe):
    """peft's LoRA on the experts and router (target_parameters) wraps them: generate, with the reason; merged,
    the experts are plain parameters again and the fast path takes the model."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, _, _ = tiny_moe
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.gate.weight"]))
    assert "merge the adapter" in supports(wrapped)
    assert supports(wrapped.merge_and_unload()) is None


def test_router_and_experts_match_the_hf_block(tiny_moe):
    """router_top_k + either expert implementation = the model's sparse MoE block, on 7 tokens (repeated
    experts)."""
    model, _, _ = tiny_moe
    block = model.model.language_model.layers[0].mlp
    torch.manual_seed(0)
    h = torch.randn(7, block.gate.weight.shape[1])
    with torch.no_grad():
        want = block(h[None])[0]
        _, hf_weights, hf_experts = block.gate(h)
        weights, experts = router_top_k(h, block.gate.weight, block.gate.top_k)
        assert torch.equal(experts, hf_experts) and torch.equal(weights, hf_weights)
        for run in (experts_grouped, experts_gathered):
            got = run(h, weights, experts, block.experts.gate_up_proj, block.experts.down_proj)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, experts, impl", [("text", "grouped", None), ("image", "gathered", None),
                                                  ("image", "grouped", None), ("text", "grouped", "pieces"),
                                                  ("image", "gathered", "pieces")])
def test_greedy_matches_generate(tiny_moe, kind, experts, impl):
    """Each way of running the routed experts, in the default step (one function a layer, as for the dense models)
    and in three pieces a layer (bench/decode.py times both on a GPU)."""
    model, processor, _ = tiny_moe
    job = _job(processor, PROMPTS[kind])
    want = _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
    _run_until_done(_batcher(model, processor, experts=experts, impl=impl), {0: [job]})
    assert job.handle.emit_tokens == want


def test_dense_and_sparse_layers_mixed(tiny_moe):
    """A model whose layer 1 is a dense MLP (``mlp_only_layers``): each layer runs its own kind; = generate."""
    from qvl.models.build import TINY_MOE_TEXT, TINY_VISION, build_config, instantiate

    _, processor, _ = tiny_moe
    config = build_config(dict(TINY_MOE_TEXT, mlp_only_layers=[1]), TINY_VISION, processor.tokenizer,
                          tie_word_embeddings=False, moe=True, vocab_size=len(processor.tokenizer))
    model = instantiate(config, seed=1)
    assert [w.top_k for w in DecodeModel(model, slots=1, max_len=64).layers] == [2, 0]
    job = _job(processor, PROMPTS["image"])
    want = _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
    _run_until_done(_batcher(model, processor), {0: [job]})
    assert job.handle.emit_tokens == want


def test_batch_of_different_lengths_matches_generate(tiny_moe):
    """Four prompts of different lengths (two with images) joining at steps 0, 0, 2 and 5, one leaving early:
    each row's tokens equal model.generate's for that prompt alone (the grouped experts run at 2 and 4 rows)."""
    model, processor, _ = tiny_moe
    jobs = {kind: _job(processor, parts) for kind, parts in PROMPTS.items()}
    want = {kind: _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
            for kind, job in jobs.items()}
    early = _job(processor, ["a short one"], GREEDY.replace(max_new_tokens=3))
    b = _batcher(model, processor)
    _run_until_done(b, {0: [jobs["text"], jobs["short"]], 2: [jobs["image"], early], 5: [jobs["two_images"]]})
    for kind, job in jobs.items():
        assert job.handle.emit_tokens == want[kind], kind
    assert len(early.handle.emit_tokens) == 3


def test_engine_and_http_server_answer_as_generate(tiny_moe):
    """`qvl serve`'s app over the engine loaded from the MoE folder: the fast path runs (no generate fallback)
    and a greedy chat completion has model.generate's text."""
    import httpx
    import sys
    from pathlib import Path

    from qvl.data.samples import Message
    from qvl.infer.transformers_backend import TransformersEngine
    from qvl.infer.types import Request
    from qvl.serve.app import ServeSettings, create_app

    sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
    from serve_helpers import Running

    model, processor, folder = tiny_moe
    notes = []
    engine = TransformersEngine.load(str(folder), device="cpu", max_batch_size=2, say=notes.append)
    reference = TransformersEngine(model, processor, name="tiny-moe", fast=False)
    server = Running(create_app(engine, ServeSettings()))
    try:
        assert engine.batcher is not None and "continuous batching" in engine.describe(), notes
        sampling = SamplingParams(temperature=0.0, presence_penalty=0.0, max_new_tokens=12, ignore_eos=True)
        want = reference.generate(Request([Message("user", ["describe the red circle"])], sampling)).text
        body = {"model": engine.name, "messages": [{"role": "user", "content": "describe the red circle"}],
                "max_tokens": 12, "temperature": 0, "presence_penalty": 0, "ignore_eos": True}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
        assert r.json()["usage"]["completion_tokens"] == 12
    finally:
        server.stop()
        engine.close()
        reference.close()


def _bench_decode():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).parents[2] / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_fused_experts_run_up_to_the_rows_where_they_stop_winning():
    """bench/decode.py's sweep of the MoE step between 1 and all rows: fused up to the last batch size before the
    first one where grouped GEMMs were faster (a later win does not count: the batches between would lose)."""
    limit = _bench_decode().fused_rows_limit
    ms = lambda fused, grouped: {"fused": fused, "grouped": grouped}  # noqa: E731
    assert limit({2: ms(5.0, 7.0), 4: ms(6.0, 7.5), 8: ms(8.0, 7.9), 16: ms(9.0, 12.0)}) == 4
    assert limit({2: ms(7.1, 7.0)}) == 1  # already slower at 2 rows: batch 1 only
    assert limit({2: ms(5.0, 7.0), 4: ms(6.0, 7.0)}) == 4
    assert limit({}) == 1


def test_bandwidth_bound_counts_the_routed_experts_only(tiny_moe):
    """bench/decode.py's batch-1 bound: attention, norms, router, k of the E experts per layer, lm_head."""
    bench = _bench_decode()
    model, _, _ = tiny_moe
    text = model.model.language_model
    cfg = text.config
    h, i, e, k, d = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.head_dim
    attention = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h
    per_layer = attention + 2 * d + 2 * h + e * h + k * 3 * h * i  # + q/k norms, two RMSNorms, router, k experts
    params = cfg.num_hidden_layers * per_layer + h + model.lm_head.weight.numel()  # + final norm, lm_head
    assert bench.decode_weight_bytes(model) == params * 4  # float32 here


@pytest.mark.slow
def test_compiled_step_matches_eager(tiny_moe):
    """torch.compile of the MoE step (what runs on a GPU) gives the eager tokens (CPU inductor; slow: compiles)."""
    model, processor, _ = tiny_moe
    outs = []
    for compiled in (False, True):
        job = _job(processor, PROMPTS["text"], GREEDY.replace(max_new_tokens=6))
        _run_until_done(_batcher(model, processor, slots=2, compile=compiled), {0: [job]})
        outs.append(job.handle.emit_tokens)
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_compiled_bf16_grouped_experts_trace_and_match(tiny_moe):
    """The GPU's configuration of the MoE half of the step: bf16 weights, grouped experts, torch.compile with dynamic
    shapes. Matches eager within bf16 rounding (CPU inductor; slow: compiles)."""
    import copy

    from qvl.infer.decode import mlp_out

    model, _, _ = tiny_moe
    layer = copy.deepcopy(model.model.language_model.layers[0]).to(torch.bfloat16)
    mlp = (layer.mlp.gate.weight, layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)
    wo, ln = layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight
    compiled = torch.compile(mlp_out, dynamic=True)
    torch.manual_seed(0)
    a, x = (torch.randn(3, wo.shape[1], dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        want = mlp_out(a, x, wo, ln, mlp, 1e-6, 2, "grouped")
        got = compiled(a, x, wo, ln, mlp, 1e-6, 2, "grouped")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_a_grouped_capture_that_fails_falls_back_to_gathering_and_keeps_the_gathered_graphs(tiny_moe, monkeypatch):
    """A CUDA-graph capture whose grouped-GEMM experts fail: from then on the experts are gathered, the graphs that
    grouped them go, those that gathered stay; a capture that runs out of memory changes nothing (the request fails).
    (The capture itself needs a GPU: it is stubbed here; what is checked is the bookkeeping around it.)"""
    model, _, _ = tiny_moe
    d = DecodeModel(model, slots=8, max_len=256)
    d._grouped_ok, d.experts, d.gather_max_rows = True, "auto", 1
    d._graphs = {(1, 128): "gathered-1", (2, 128): "grouped-2"}
    d._pool = "pool"
    failures = {"grouped": RuntimeError("no kernel"), "oom": None}

    def capture_once(b, lb):
        if d._grouped_for(b) and failures["grouped"]:
            raise failures["grouped"]
        if failures["oom"]:
            raise failures["oom"]
        d._graphs[(b, lb)] = f"captured-{b}"
        return d._graphs[(b, lb)]

    monkeypatch.setattr(d, "_capture_once", capture_once)
    failures["oom"] = torch.OutOfMemoryError("CUDA out of memory")
    failures["grouped"] = None
    with pytest.raises(torch.OutOfMemoryError):
        d._capture(4, 128)
    assert d._grouped_ok and set(d._graphs) == {(1, 128), (2, 128)}  # nothing changed
    failures["oom"], failures["grouped"] = None, RuntimeError("no kernel")
    assert d._capture(4, 128) == "captured-4"
    assert not d._grouped_ok and not d._grouped_for(4)
    assert set(d._graphs) == {(1, 128), (4, 128)} and d._pool == "pool"  # the gathered graph stays, its pool too


def test_experts_run_grouped_at_every_batch_size_by_default(tiny_moe):
    """Grouped GEMMs beat gathering at 1 and 32 rows on a GPU (30B-A3B, bench/results/decode_moe_h100.json): where
    the fused kernels do not run (this CPU) the default groups at batch 1 too; gathering stays for where grouping
    cannot run."""
    model, _, _ = tiny_moe
    d = DecodeModel(model, slots=4, max_len=64)
    assert d.experts == "auto" and all(d._grouped_for(n) for n in (1, 2, 4))
    d._grouped_ok = False  # e.g. a capture failed, or non-bf16 weights under compile
    assert not d._grouped_for(1)


def test_fused_experts_run_where_asked_and_their_kernels_run(tiny_moe):
    """Triton's fused experts (qvl.infer.moe_kernels): up to fused_max_rows rows under "auto" (8 by default: faster
    than grouped at 1-8 rows on an H100), every batch under "fused"; never where the kernels cannot run (a CPU
    without the interpreter): there grouped GEMMs as before."""
    model, _, _ = tiny_moe
    d = DecodeModel(model, slots=4, max_len=64)
    assert not d._fused_ok and d._experts_for(1) == "grouped"  # this CPU
    d.set_impl(d.impl, "fused")
    assert d._experts_for(1) == "grouped"
    d._fused_ok = True  # as on a GPU with Triton
    assert [d._experts_for(n) for n in (1, 4)] == ["fused", "fused"]
    d.set_impl(d.impl, "auto")
    assert d.fused_max_rows == EXPERTS_FUSED_MAX_ROWS == 8
    assert [d._experts_for(n) for n in (1, 4, 8, 16)] == ["fused", "fused", "fused", "grouped"]
    d.fused_max_rows = 2
    assert [d._experts_for(n) for n in (1, 2, 4)] == ["fused", "fused", "grouped"]


def test_a_fused_capture_that_fails_falls_back_to_grouping(tiny_moe, monkeypatch):
    """A capture whose fused experts fail to compile or capture: from then on they run grouped; the graphs that fused
    them go, the others stay (the capture is stubbed: the bookkeeping is what is checked)."""
    model, _, _ = tiny_moe
    d = DecodeModel(model, slots=8, max_len=256)
    d._fused_ok, d.fused_max_rows = True, 2
    d._graphs = {(1, 128): "fused-1", (4, 128): "grouped-4"}
    d._pool = "pool"

    def capture_once(b, lb):
        if d._experts_for(b) == "fused":
            raise RuntimeError("triton: out of resources")
        d._graphs[(b, lb)] = f"captured-{b}"
        return d._graphs[(b, lb)]

    monkeypatch.setattr(d, "_capture_once", capture_once)
    assert d._capture(2, 128) == "captured-2"
    assert not d._fused_ok and d._experts_for(1) == "grouped" and d._grouped_ok
    assert set(d._graphs) == {(4, 128), (2, 128)} and d._pool == "pool"
