"""The memory planner: formulas, verdicts, monotonicity, anchors, JSON, CLI and preflight."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qvl.errors import QvlError
from qvl.models.sizes import SIZES
from qvl.plan import parse_mem, plan_serve, plan_train, preflight_serve, preflight_train, resolve_gpu
from qvl.plan.gpus import GIB

# KV bytes per token by hand: 2 (K and V) × layers × kv_heads × head_dim 128 × 2 bytes (bf16).
HAND_KV = {
    "2B": 2 * 28 * 8 * 128 * 2,  # 114,688
    "4B": 2 * 36 * 8 * 128 * 2,  # 147,456
    "8B": 2 * 36 * 8 * 128 * 2,
    "32B": 2 * 64 * 8 * 128 * 2,
    "30B-A3B": 2 * 48 * 4 * 128 * 2,
    "235B-A22B": 2 * 94 * 4 * 128 * 2,
}


@pytest.mark.parametrize("size", list(SIZES))
def test_kv_formula_matches_hand_computation(size):
    p = plan_serve(size, "h200", max_model_len=32768, recommend=False)
    assert p.kv_bytes_per_token == HAND_KV[size]
    assert p.kv_needed_gib == pytest.approx(HAND_KV[size] * 32768 / GIB)


def test_kv_full_context_8b_is_36_gib():
    assert plan_serve("8B", "h100", recommend=False).kv_needed_gib == pytest.approx(36.0)
    assert plan_serve("8B", "h100", kv_cache_dtype="fp8", recommend=False).kv_needed_gib == pytest.approx(18.0)


def test_vllm_accounting_formula():
    p = plan_serve("8B", "h100", gpu_memory_utilization=0.8, recommend=False)
    expected = (0.8 * 79.2 - p.parts["weights"] - p.parts["vLLM non-torch memory"]
                - p.parts["vLLM profiling peak"] - p.parts["CUDA graphs"])
    assert p.kv_available_gib == pytest.approx(expected)
    assert p.parts["weights"] == pytest.approx(SIZES["8B"].params_total * 2 / GIB)
    # vLLM takes the whole budget: total = context + util × card
    assert p.total_gib == pytest.approx(0.5 + 0.8 * 79.2)
    assert p.max_model_len_that_fits == min(262144, int(p.kv_available_gib * GIB // HAND_KV["8B"]) // 16 * 16)


def test_vllm_verdicts():
    assert plan_serve("8B", "h100", recommend=False).fits  # 36 GiB of KV fits in ~51 GiB
    small = plan_serve("8B", "rtx4090")
    assert not small.fits and 0 < small.max_model_len_that_fits < 262144
    fixed = [r for r in small.recommendations if r.fits]
    assert fixed and "max_model_len" in fixed[0].changes
    # the official demo's 0.70 utilisation misses the full context on an H100 by a little
    assert not plan_serve("8B", "h100", gpu_memory_utilization=0.7, recommend=False).fits
    assert not plan_serve("32B", "rtx4090", recommend=False).fits  # weights alone are larger than the card
    assert plan_serve("32B", "rtx4090", recommend=False).max_model_len_that_fits == 0


def test_more_gpus_tensor_parallel_shrinks_per_gpu_needs():
    one = plan_serve("32B", "h100", recommend=False)
    two = plan_serve("32B", "h100", gpus=2, recommend=False)
    assert two.parts["weights"] == pytest.approx(one.parts["weights"] / 2)
    assert two.kv_available_gib > one.kv_available_gib


# --- training ---------------------------------------------------------------------------------------------
# ../shared/reference/h100_baseline.md: 8B, LoRA r64, grad ckpt, AdamW, peak allocated on an H100.
ANCHORS = [
    (dict(batch=2, seq_len=2007, max_pixels=448 * 448), 27.6),
    (dict(batch=4, seq_len=2007, max_pixels=448 * 448), 36.7),
    # variable-length batch padded to the longest sample (1,397 tokens), LoRA on q/k/v/o only
    (dict(batch=4, seq_len=1397, lora_targets="q,k,v,o", max_pixels=1024 * 1024), 29.9),
]


@pytest.mark.parametrize("kw,measured", ANCHORS)
def test_h100_anchors_within_10_percent(kw, measured):
    p = plan_train("8B", "h100", method="lora", lora_r=64, gradient_checkpointing=True, recommend=False, **kw)
    assert abs(p.peak_allocated_gib / measured - 1) < 0.10, (p.peak_allocated_gib, measured)
    assert p.total_gib > p.peak_allocated_gib  # context + allocator reserve on top


@pytest.mark.parametrize("key,lo,hi", [("batch", 1, 4), ("seq_len", 1024, 8192), ("max_pixels", 200_704, 1_048_576),
                                       ("lora_r", 8, 256), ("gpus", 1, 1)])
def test_monotone_in_settings(key, lo, hi):
    a = plan_train("4B", "h100", recommend=False, **{key: lo})
    b = plan_train("4B", "h100", recommend=False, **{key: hi})
    assert b.total_gib >= a.total_gib
    if lo != hi:
        assert b.total_gib > a.total_gib


def test_checkpointing_full_and_vision_cost_more():
    base = plan_train("2B", "h100", batch=2, recommend=False)
    assert plan_train("2B", "h100", batch=2, gradient_checkpointing=False, recommend=False).total_gib > base.total_gib
    assert plan_train("2B", "h100", batch=2, method="full", recommend=False).total_gib > base.total_gib
    assert plan_train("2B", "h100", batch=2, tune_mm_vision=True, recommend=False).total_gib > base.total_gib
    assert plan_train("2B", "h100", batch=2, method="qlora", recommend=False).total_gib < base.total_gib


def test_video_tokens_count_frame_pairs():
    a = plan_train("2B", "h100", video_max_frames=8, video_frame_pixels=131072, images_per_sample=0,
                   recommend=False)
    assert "2,048 patches" in a.notes["vision activations"]
    # 8 frames → 4 pairs × 128 tokens = 512 tokens → 2,048 patches
    assert "512 visual tokens" in a.notes["vision activations"]


def test_zero_stages_shard_per_gpu_memory():
    kw = dict(method="full", batch=1, seq_len=2048, gpus=8, recommend=False)
    z0 = plan_train("8B", "h100", zero=0, **kw)
    z2 = plan_train("8B", "h100", zero=2, **kw)
    z3 = plan_train("8B", "h100", zero=3, **kw)
    assert z3.parts["weights"] == pytest.approx(z0.parts["weights"] / 8)
    assert z3.total_gib < z2.total_gib
    off = plan_train("8B", "h100", zero=3, offload=True, **kw)
    assert off.parts["optimizer states"] == 0 and off.cpu_ram_gib > 0
    assert not plan_train("8B", "h100", method="full", zero=1, gpus=1, recommend=False).fits


def test_train_verdicts_and_recommendations_fit_when_applied():
    kw = dict(method="lora", batch=2, seq_len=2048)
    p = plan_train("8B", "rtx4090", **kw)
    assert not p.fits and p.headroom_gib < 0
    good = [r for r in p.recommendations if r.fits]
    assert good
    for r in good:
        assert plan_train("8B", "rtx4090", recommend=False, **{**kw, **r.changes}).fits, r.text
    ok = plan_train("2B", "h100", batch=4, seq_len=4096)
    assert ok.fits and ok.headroom_gib > 0
    assert ok.max_batch_that_fits >= 4 and ok.max_seq_len_that_fits >= 4096
    assert plan_train("2B", "h100", batch=ok.max_batch_that_fits, seq_len=4096, recommend=False).fits
    assert not plan_train("2B", "h100", batch=ok.max_batch_that_fits + 1, seq_len=4096, recommend=False).fits


def test_full_finetune_recommendation_on_small_card():
    p = plan_train("4B", "l40s", method="full", batch=4, seq_len=4096)
    assert not p.fits
    good = [r for r in p.recommendations if r.fits]
    assert good
    assert plan_train("4B", "l40s", recommend=False, **{**dict(method="full", batch=4, seq_len=4096),
                                                          **good[0].changes}).fits


def test_json_schema():
    d = plan_serve("8B", "h100").to_json()
    for key in ("fits", "total_gib", "parts", "kv_bytes_per_token", "kv_needed_gib", "kv_available_gib",
                "max_model_len_that_fits", "recommendations"):
        assert key in d
    assert isinstance(d["fits"], bool) and isinstance(d["parts"], dict) and isinstance(d["recommendations"], list)
    assert sum(d["parts"].values()) == pytest.approx(d["total_gib"], abs=0.02)
    json.dumps(d)
    t = plan_train("8B", "rtx4090").to_json()
    assert {"fits", "total_gib", "parts", "kv_bytes_per_token", "recommendations"} <= set(t)


# --- GPUs and inputs -------------------------------------------------------------------------------------
def test_gpu_table_and_memory_parsing():
    assert resolve_gpu("H100").total_gib > 78 and resolve_gpu("h200").total_gib > 130
    for name in ("a100-80g", "a100-40g", "l40s", "rtx4090", "rtx5090", "rtx3090", "a10g", "l4"):
        assert resolve_gpu(name).total_gib > 0
    assert parse_mem("32GiB") == 32 and parse_mem("32") == 32
    assert parse_mem("24GB") == pytest.approx(24e9 / GIB)
    assert parse_mem("81559MiB") == pytest.approx(81559 / 1024)
    with pytest.raises(QvlError, match="unknown GPU"):
        resolve_gpu("gtx970")
    with pytest.raises(QvlError, match="memory size"):
        parse_mem("lots")
    p = plan_serve("2B", gpu_mem="32GiB", recommend=False)
    assert p.gpu_total_gib == 32


def test_unknown_model_and_bad_settings():
    with pytest.raises(QvlError, match="unknown model"):
        plan_train("7B", "h100")
    with pytest.raises(QvlError, match="unknown training method"):
        plan_train("2B", "h100", method="dora")
    with pytest.raises(QvlError, match="ZeRO"):
        plan_train("2B", "h100", offload=True)
    with pytest.raises(QvlError, match="visual tokens"):
        plan_train("2B", "h100", seq_len=256, max_pixels=1024 * 1024)
    with pytest.raises(QvlError, match="no GPU"):
        plan_serve("2B")


def test_hub_id_is_a_size():
    assert plan_serve("Qwen/Qwen3-VL-4B-Instruct", "h100", recommend=False).model == "4B"


def test_config_json_path_matches_size_facts(tmp_path):
    s = SIZES["2B"]
    cfg = {"model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"],
           "text_config": s.text_config(), "vision_config": s.vision_config(), "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    by_path = plan_train(str(tmp_path), "h100", recommend=False)
    by_name = plan_train("2B", "h100", recommend=False)
    assert by_path.kv_bytes_per_token == by_name.kv_bytes_per_token
    assert by_path.parts["weights"] == pytest.approx(by_name.parts["weights"])
    assert by_path.total_gib == pytest.approx(by_name.total_gib)


@pytest.mark.parametrize("key", ["num_experts", "num_local_experts"])
def test_moe_config_json_plans_as_the_moe_size(tmp_path, key):
    """The official config.json says ``num_experts``; newer transformers save ``num_local_experts``: either way a
    30B-A3B checkpoint folder plans as 30B-A3B, its experts' LoRA included (planned as dense it "fit" an H100 with
    64 GiB of its 102, and the first step ran out of memory)."""
    s = SIZES["30B-A3B"]
    text = s.text_config()
    text[key] = text.pop("num_experts")
    cfg = {"model_type": "qwen3_vl_moe", "architectures": ["Qwen3VLMoeForConditionalGeneration"],
           "text_config": text, "vision_config": s.vision_config(), "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    by_path = plan_train(str(tmp_path), "h100", recommend=False)
    by_name = plan_train("30B-A3B", "h100", recommend=False)
    assert by_path.parts["LoRA params"] == pytest.approx(by_name.parts["LoRA params"])
    assert by_path.total_gib == pytest.approx(by_name.total_gib) and not by_path.fits


# --- CLI --------------------------------------------------------------------------------------------------
def _cli(args):
    from qvl.cli.main import app

    return CliRunner().invoke(app, args)


def test_cli_serve_json():
    r = _cli(["plan", "serve", "8B", "--gpu", "h100", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["fits"] is True and d["max_model_len_that_fits"] == 262144
    assert d["kv_bytes_per_token"] == HAND_KV["8B"]


def test_cli_train_table_and_exit_code():
    """The CLI plans `qvl train`'s defaults (fused loss, no LoRA dropout); --no-fused-ce --lora-dropout 0.05 plans
    transformers + peft's, whose full-vocabulary logits do not fit the same card."""
    r = _cli(["plan", "train", "8B", "--gpu", "rtx4090", "--batch", "2", "--seq-len", "2048"])
    assert r.exit_code == 0 and "fits: 23.1 GiB" in r.stdout and "fused linear + cross-entropy" in r.stdout
    r = _cli(["plan", "train", "8B", "--gpu", "rtx4090", "--batch", "2", "--seq-len", "2048", "--no-fused-ce",
              "--lora-dropout", "0.05"])
    assert r.exit_code == 1
    assert "does not fit" in r.stdout and "logits / loss" in r.stdout and "recommendations" in r.stdout
    assert "--fused-ce: the loss in row chunks" in r.stdout  # qvl train's default, advised first
    r = _cli(["plan", "train", "2B", "--gpu-mem", "80GiB", "--method", "lora", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["fits"] is True


def test_cli_errors_are_friendly():
    r = _cli(["plan", "serve", "8B", "--gpu", "gtx970"])
    assert r.exit_code == 2 and "unknown GPU" in r.output and "--gpu-mem" in r.output
    r = _cli(["plan", "train", "9B", "--gpu", "h100"])
    assert r.exit_code == 2 and "unknown model" in r.output
    r = _cli(["plan", "gpus"])
    assert r.exit_code == 0 and "rtx4090" in r.stdout


# --- preflight --------------------------------------------------------------------------------------------
def test_preflight_serve_picks_largest_context():
    pf = preflight_serve("8B", gpu="rtx4090")
    assert pf.ok
    n = pf.settings["max_model_len"]
    assert n % 1024 == 0 and 4096 <= n < 262144
    assert pf.message.startswith("max_model_len 262,144 does not fit; using ") and "KV" in pf.message
    assert plan_serve("8B", "rtx4090", max_model_len=n, recommend=False).fits
    fine = preflight_serve("8B", gpu="h100")
    assert fine.ok and fine.settings["max_model_len"] == 262144 and "fits" in fine.message
    bad = preflight_serve("32B", gpu="rtx4090")
    assert not bad.ok and "does not fit" in bad.message
    asked = preflight_serve("8B", gpu="rtx4090", max_model_len=8192)
    assert asked.ok and asked.settings["max_model_len"] == 8192
    # a utilisation vLLM cannot get is not fixed by a shorter context; and the context is never raised above
    # the one asked for (was: ok, 'max_model_len 8,192 does not fit; using 262,144')
    greedy = preflight_serve("8B", gpu="h100", gpu_memory_utilization=1.0, max_model_len=8192)
    assert not greedy.ok and "--gpu-memory-utilization 1.0" in greedy.message


def test_preflight_train_stops_unless_forced():
    pf = preflight_train("8B", gpu="rtx4090", method="lora", batch=2, seq_len=2048)
    assert not pf.ok and "does not fit" in pf.message and "try" in pf.message
    with pytest.raises(QvlError, match="memory preflight"):
        pf.raise_if_not_ok()
    pf.raise_if_not_ok(force=True)
    assert preflight_train("8B", gpu="rtx4090", force=True, method="lora", batch=2, seq_len=2048).ok
    assert preflight_train("2B", gpu="h100", method="lora").ok


def test_preflight_without_gpu_skips(monkeypatch):
    import qvl.plan.preflight as pre

    monkeypatch.setattr(pre, "detect_gpu", lambda: None)
    assert pre.preflight_train("8B").ok and pre.preflight_serve("8B").plan is None


def test_master_fp32_counts_fp32_weights_grads_and_states():
    from qvl.plan.memory import plan_train

    bf16 = plan_train("2B", gpu_mem="80GiB", method="full", recommend=False)
    fp32 = plan_train("2B", gpu_mem="80GiB", method="full", recommend=False, master_fp32=True)
    trained = fp32.parts["gradients"] - bf16.parts["gradients"]  # 2 more bytes per trained param
    assert trained > 0
    assert fp32.parts["weights"] - bf16.parts["weights"] == pytest.approx(trained, rel=1e-6)
    assert fp32.parts["optimizer states"] == pytest.approx(2 * bf16.parts["optimizer states"], rel=1e-6)
    lora = plan_train("2B", gpu_mem="80GiB", method="lora", recommend=False, master_fp32=True, tune_mm_mlp=False)
    assert lora.total_gib == pytest.approx(plan_train("2B", gpu_mem="80GiB", method="lora", recommend=False,
                                                  tune_mm_mlp=False).total_gib)
    zero = plan_train("2B", gpu_mem="80GiB", method="full", zero=2, recommend=False, master_fp32=True)
    assert zero.total_gib == pytest.approx(plan_train("2B", gpu_mem="80GiB", method="full", zero=2,
                                                      recommend=False).total_gib)


def test_moe_lora_counts_the_experts_adapters_and_their_activations():
    """30B-A3B with qvl's default lora_experts: a rank-r pair per expert and weight (r·E·(2h + 3I) per layer) in the
    adapters, their gradients and both AdamW states, and the rank-r intermediates of every routed copy."""
    from qvl.train.config import build_config
    from qvl.train.preflight import plan_kwargs

    kw = dict(lora_r=64, seq_len=4096, fused_ce=True, recommend=False)
    on = plan_train("30B-A3B", "h200", **kw)
    off = plan_train("30B-A3B", "h200", lora_experts=False, **kw)
    experts = 48 * 64 * 128 * (2 * 2048 + 3 * 768)  # 2.5 B params
    assert (on.parts["LoRA params"] - off.parts["LoRA params"]) * GIB == pytest.approx(experts * 4)
    assert (on.parts["gradients"] - off.parts["gradients"]) * GIB == pytest.approx(experts * 4)
    assert (on.parts["optimizer states"] - off.parts["optimizer states"]) * GIB == pytest.approx(experts * 8)
    assert on.settings["lora_experts"] and "128 experts" in on.notes["LoRA params"]
    assert "gate" not in off.notes["LoRA params"]  # a MoE layer has no dense MLP for those targets
    kept = dict(kw, gradient_checkpointing=False)
    routed = 4096 * 48 * 8 * 2 * 2 * 64  # two rank-64 bf16 intermediates per routed copy (top-8), every layer
    assert (plan_train("30B-A3B", "h200", **kept).parts["LLM activations"]
            - plan_train("30B-A3B", "h200", lora_experts=False, **kept).parts["LLM activations"]) * GIB \
        == pytest.approx(routed)
    assert on.fits  # examples/lora_30b_a3b.yaml's setting on one H200
    assert plan_train("8B", "h100", lora_experts=False, **kw).total_gib == plan_train("8B", "h100", **kw).total_gib
    values = {"model_name_or_path": "x", "dataset_use": "x", "output_dir": "x", "lora_enable": True}
    assert plan_kwargs(build_config(values))["lora_experts"]
    assert not plan_kwargs(build_config({**values, "lora_experts": False}))["lora_experts"]
    assert not plan_kwargs(build_config({**values, "lora_target_regex": r".*q_proj"}))["lora_experts"]


def test_30b_a3b_serving_kv_is_96_kib_per_token_on_every_path():
    """30B-A3B: 2 (K, V) × 48 layers × 4 KV heads × 128 × 2 bytes = 96 KiB per token, in the planner (vLLM,
    generate, the fast decode path) and in the config the decode path sizes its slot cache from."""
    from qvl.models.build import official_config
    from qvl.plan.model import from_size

    assert HAND_KV["30B-A3B"] == 96 * 1024
    for kw in ({}, {"backend": "transformers"}, {"backend": "transformers", "fast_decode": True, "max_num_seqs": 32}):
        p = plan_serve("30B-A3B", "h200", max_model_len=4096, recommend=False, **kw)
        assert p.kv_bytes_per_token == 96 * 1024, kw
    t = official_config("30B-A3B").text_config
    assert 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2 == 96 * 1024
    fast = plan_serve("30B-A3B", "h200", backend="transformers", max_model_len=2048, max_num_seqs=32,
                      fast_decode=True, recommend=False)
    assert fast.parts["KV cache"] == pytest.approx(32 * 2048 * 96 * 1024 / GIB)  # 6 GiB of slots
    assert fast.parts["weights"] == pytest.approx(from_size(SIZES["30B-A3B"]).params_total * 2 / GIB)  # all experts


def test_fast_decode_serve_plan_prefills_a_few_requests_and_keeps_a_vision_cache():
    """The fast path prefills at most FAST_PREFILL_TOKENS (of FAST_PREFILL_REQUESTS requests) at a time, not the
    whole batch as generate does; the constants are the continuous batcher's own defaults."""
    import inspect

    from qvl.infer.continuous import ContinuousBatcher
    from qvl.infer.continuous import PREFILL_PART_TOKENS
    from qvl.plan.memory import (FAST_PREFILL_PART_TOKENS, FAST_PREFILL_REQUESTS, FAST_PREFILL_TOKENS,
                                 layer_transient_bytes_per_token)
    from qvl.plan.model import from_size

    defaults = inspect.signature(ContinuousBatcher).parameters
    assert defaults["max_prefill_tokens"].default == FAST_PREFILL_TOKENS
    assert defaults["max_prefill_batch"].default == FAST_PREFILL_REQUESTS
    assert defaults["prefill_part_tokens"].default == PREFILL_PART_TOKENS == FAST_PREFILL_PART_TOKENS
    kw = dict(backend="transformers", max_model_len=2048, max_num_seqs=64, recommend=False)
    for size in ("8B", "30B-A3B"):
        generate, fast = plan_serve(size, "h200", **kw), plan_serve(size, "h200", fast_decode=True, **kw)
        assert fast.parts["KV cache"] == generate.parts["KV cache"] and fast.parts["vision cache"] == 1.0
        assert fast.parts["activations (prefill / vision)"] < generate.parts["activations (prefill / vision)"] / 4
        # a packed prefill of FAST_PREFILL_TOKENS tokens through one layer at a time (its embedded row 8 bytes x
        # hidden a token); no temporary KV cache (keys and values go straight into the slots). A 2,048-token context
        # has no prompt in parts
        m = from_size(SIZES[size])
        prefill = FAST_PREFILL_TOKENS * (layer_transient_bytes_per_token(m) + 8 * m.hidden) / 2**30
        temporary_cache = FAST_PREFILL_TOKENS * fast.kv_bytes_per_token / 2**30
        assert prefill <= fast.parts["activations (prefill / vision)"] < prefill + temporary_cache
        assert fast.settings["fast_decode"] and "fast_decode" not in generate.settings
        # a longer context: a prompt prefilled in parts keeps its embedded row while other prefills run
        long = plan_serve(size, "h200", fast_decode=True, **{**kw, "max_model_len": 32768, "max_num_seqs": 4})
        assert long.parts["activations (prefill / vision)"] >= (
            FAST_PREFILL_TOKENS * (layer_transient_bytes_per_token(m) + 8 * m.hidden) + 32768 * 8 * m.hidden) / 2**30
    moe = from_size(SIZES["30B-A3B"])  # the k routed copies of each token dominate an MoE layer's prefill
    assert layer_transient_bytes_per_token(moe) == 12 * 2048 + 8 * 8 * 2048 + 6 * 128


def test_cli_serve_transformers_plans_qvl_serves_decode_path():
    """`qvl plan serve --backend transformers` plans what `qvl serve` runs (--decode fast) unless told generate."""
    args = ["plan", "serve", "30B-A3B", "--gpu", "h200", "--backend", "transformers", "--max-num-seqs", "32",
            "--max-model-len", "2048", "--json"]
    fast, generate = _cli(args), _cli(args + ["--decode", "generate"])
    assert fast.exit_code == 0 and generate.exit_code == 0, fast.output + generate.output
    fast, generate = json.loads(fast.stdout), json.loads(generate.stdout)
    assert fast["settings"]["fast_decode"] and "fast_decode" not in generate["settings"]
    assert fast["kv_bytes_per_token"] == generate["kv_bytes_per_token"] == 96 * 1024
    assert fast["total_gib"] < generate["total_gib"]
    bad = _cli(["plan", "serve", "8B", "--gpu", "h200", "--backend", "transformers", "--decode", "fastest"])
    assert bad.exit_code != 0 and "fast or generate" in bad.output


def test_moe_compiled_layer_counts_the_routed_copies():
    """A compiled MoE layer (not measured compiled) keeps what the eager one keeps for routing: the k routed copies
    and the experts' weighted outputs (4·k·h), their order (16·k), the router's fp32 logits and probabilities (8·E)."""
    from dataclasses import replace

    from qvl.plan.memory import compiled_layer_saved_bytes_per_token
    from qvl.plan.model import resolve_model

    m = resolve_model("30B-A3B")
    same_width = replace(m, moe_experts=0, moe_topk=0, moe_intermediate=0, intermediate=8 * 768)
    for budget in (None, 0.9, 0.8):
        assert compiled_layer_saved_bytes_per_token(m, budget, 64, 4, True) - \
            compiled_layer_saved_bytes_per_token(same_width, budget, 64, 4, True) == 8 * (4 * 2048 + 16) + 8 * 128


def test_vision_only_lora_plans_the_tower_not_the_llm():
    """lora_targets=vision: the tower's adapters, not the LLM's seven per layer, and the tower's activations kept
    for its backward (frozen, it only has a transient forward)."""
    kw = dict(batch=1, seq_len=4096, max_pixels=1024 * 1024, images_per_sample=1, lora_dropout=0.0, recommend=False)
    llm, vision = (plan_train("8B", "h100", lora_targets=t, **kw) for t in ("all", "vision"))
    assert vision.parts["LoRA params"] < llm.parts["LoRA params"] / 4
    assert "r=64 on vision" in vision.notes["LoRA params"]
    assert "trained" in vision.notes["vision activations"] and "frozen" in llm.notes["vision activations"]
    assert vision.parts["vision activations"] > llm.parts["vision activations"]
    kept = [plan_train("8B", "h200", lora_targets=t, gradient_checkpointing=False, **kw).parts["LLM activations"]
            for t in ("all", "vision")]
    assert kept[1] < kept[0]  # every layer kept: no adapter inputs in the LLM's
    both = plan_train("8B", "h100", lora_targets="llm,vision", **kw)
    assert both.parts["LoRA params"] == pytest.approx(llm.parts["LoRA params"] + vision.parts["LoRA params"])
    with pytest.raises(QvlError, match="unknown LoRA target"):
        plan_train("8B", "h100", lora_targets="tower", **kw)
    with pytest.raises(QvlError, match="no LoRA target"):
        plan_train("8B", "h100", lora_targets="", **kw)
    moe = {t: plan_train("30B-A3B", "h200", lora_targets=t, **kw) for t in ("all", "vision")}
    assert "experts" in moe["all"].notes["LoRA params"]  # the experts' adapters come with the LLM's
    assert "experts" not in moe["vision"].notes["LoRA params"]
    assert moe["vision"].parts["LoRA params"] < moe["all"].parts["LoRA params"] / 20


def test_a_lower_lora_rank_is_recommended_where_it_fits():
    """30B-A3B with the experts' LoRA at r=64 does not fit an 80 GB card (2.5 B adapter params, fp32 + AdamW); the
    largest rank that does is recommended, and `qvl train`'s preflight names it as a key."""
    from qvl.plan.memory import Recommendation
    from qvl.train.config import build_config
    from qvl.train.preflight import train_fix

    p = plan_train("30B-A3B", "h100", seq_len=4096, fused_ce=True, max_pixels=401_408)
    assert not p.fits
    ranks = [r for r in p.recommendations if "lora_r" in r.changes]
    assert [r.changes for r in ranks] == [{"lora_r": 16}] and ranks[0].fits
    assert plan_train("30B-A3B", "h100", seq_len=4096, fused_ce=True, max_pixels=401_408, lora_r=16).fits
    assert not plan_train("30B-A3B", "h100", seq_len=4096, fused_ce=True, max_pixels=401_408, lora_r=32).fits
    cfg = build_config(dict(model_name_or_path="m", dataset_use="d", lora_enable=True))
    assert train_fix(Recommendation("", {"lora_r": 16}, 73.2, True), cfg) == "lora_r=16 lora_alpha=32 (→ 73.2 GiB)"
