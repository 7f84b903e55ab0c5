"""One vLLM server for two things: a LoRA output folder served through vLLM answers as the merged model does
(transformers), and a context that does not fit the KV space is lowered to one that starts."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from serve_helpers import data_url, png_bytes  # noqa: E402

KV_GIB = 0.03  # 32.2 MB at 2 KiB a token (4 layers x 2 KV heads x head dim 32, K and V, float32): 15,488 tokens
ASKED = 32_768  # the model's native context, twice what fits


@pytest.fixture(scope="module")
def adapter_dir(vllm_model_dir, tmp_path_factory):
    """A language-model LoRA (what `qvl train --lora` writes for the LLM; vLLM serves it as a LoRA adapter),
    initialised at random so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qvl.models.load import load_model

    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                     target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    torch.manual_seed(0)
    model = get_peft_model(load_model(vllm_model_dir), cfg)
    with torch.no_grad():  # random LoRA weights large enough to change greedy answers of a random model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("lora") / "run" / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_server(vllm_model_dir, adapter_dir, start_server):
    s = start_server(["-c", str(vllm_model_dir), "--adapter", str(adapter_dir), "--backend", "vllm",
                      "--max-model-len", str(ASKED), "--kv-cache-gib", str(KV_GIB), "--server-name", "127.0.0.1",
                      "--server-port", "{port}"], name="vllm-lora")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def merged_engine(vllm_model_dir, adapter_dir, tmp_path_factory):
    from qvl.infer.merge import merge_adapter
    from qvl.infer.transformers_backend import TransformersEngine

    out = tmp_path_factory.mktemp("merged") / "tiny"
    merge_adapter(vllm_model_dir, adapter_dir, out)
    engine = TransformersEngine.load(str(out), device="cpu", max_model_len=4096)
    yield engine
    engine.close()


def messages(kind: str):
    from PIL import Image

    from qvl.data.samples import Media, Message

    if kind == "text":
        api = [{"role": "user", "content": "What colour is the circle?"}]
        qvl = [Message("user", ["What colour is the circle?"])]
    else:
        png = png_bytes(64, 48, (30, 160, 30))
        api = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
                                            {"type": "text", "text": "Colour?"}]}]
        import io

        qvl = [Message("user", [Media("image", Image.open(io.BytesIO(png)).convert("RGB")), "Colour?"])]
    return api, qvl


@pytest.mark.parametrize("kind", ["text", "image"])
def test_lora_through_vllm_answers_as_the_merged_model(lora_server, merged_engine, vllm_model_dir, kind):
    from qvl.infer.types import Request

    api, qvl = messages(kind)
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="none", timeout=120, max_retries=0)
    served = client.chat.completions.create(model="tiny", messages=api, max_tokens=16, temperature=0,
                                            presence_penalty=0).choices[0].message.content
    merged = merged_engine.generate(Request(qvl, merged_engine.sampling(temperature=0, presence_penalty=0,
                                                                        max_new_tokens=16))).text
    assert served == merged or (merged.endswith("\ufffd") and served == merged.rstrip("\ufffd"))  # test_serve.same_text
    assert "served as vLLM LoRA" in lora_server.log or "merging it into the base" in lora_server.log


def test_adapter_changes_the_answers(lora_server, vllm_model_dir):
    """Guards the test above: with the base weights the answer differs, so the adapter was applied."""
    from qvl.infer.transformers_backend import TransformersEngine
    from qvl.infer.types import Request

    api, qvl = messages("text")
    base = TransformersEngine.load(str(vllm_model_dir), device="cpu", max_model_len=4096)
    plain = base.generate(Request(qvl, base.sampling(temperature=0, presence_penalty=0, max_new_tokens=16))).text
    base.close()
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="none", timeout=120, max_retries=0)
    served = client.chat.completions.create(model="tiny", messages=api, max_tokens=16, temperature=0,
                                            presence_penalty=0).choices[0].message.content
    assert served != plain


def test_context_that_does_not_fit_is_lowered_to_one_that_starts(lora_server):
    blocks = int(KV_GIB * 2**30) // (2048 * 128)  # vLLM's CPU blocks are 128 tokens; it keeps one back
    fits = (blocks - 1) * 128
    assert f"context lowered from {ASKED:,} to {fits:,} tokens" in lora_server.log
    assert f"vLLM KV cache: {blocks * 128:,} tokens; context {fits:,} tokens" in lora_server.log  # vLLM's numbers
    long_text = "red green blue " * 1500  # ~4,500 tokens: more than a 4K context, well inside the one chosen
    r = httpx.post(lora_server.url + "/v1/chat/completions", timeout=300, json={
        "model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": long_text}]})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 4096, r.text
    r = httpx.post(lora_server.url + "/v1/chat/completions", timeout=300, json={
        "model": "tiny", "messages": [{"role": "user", "content": long_text * 4}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert f"{fits}" in r.json()["error"]["message"]
