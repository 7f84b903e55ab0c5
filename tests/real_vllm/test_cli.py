"""`qvl infer --backend vllm` and `qvl eval --backend vllm` (batched greedy generation through vLLM) give what
the transformers backend gives, run as a user runs them (one vLLM start each)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")
from serve_helpers import png_bytes  # noqa: E402
from servers import QVL  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def qvl(*args, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([QVL, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def same_text(vllm_text: str, hf_text: str) -> bool:  # see test_serve.same_text
    return vllm_text == hf_text or (hf_text.endswith("\ufffd") and vllm_text == hf_text.rstrip("\ufffd"))


@pytest.fixture(scope="module")
def red_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "red.png"
    path.write_bytes(png_bytes(64, 48, (200, 30, 30)))
    return path


def test_infer_backend_vllm_equals_transformers(vllm_model_dir, red_png):
    """stdout is the answer alone (vLLM's own logging goes to stderr), the transformers engine's answer."""
    from PIL import Image

    from qvl.data.samples import Media, Message
    from qvl.infer.transformers_backend import TransformersEngine
    from qvl.infer.types import Request

    via_vllm = qvl("infer", "What colour?", "-m", str(vllm_model_dir), "--image", str(red_png), "--backend", "vllm",
                   "--temperature", "0", "--presence-penalty", "0", "--max-new-tokens", "12")
    assert "vLLM KV cache:" in via_vllm.stderr and "INFO" not in via_vllm.stdout
    engine = TransformersEngine.load(str(vllm_model_dir), device="cpu", max_model_len=4096)
    messages = [Message("user", [Media("image", Image.open(red_png).convert("RGB")), "What colour?"])]
    want = engine.generate(Request(messages, engine.sampling(temperature=0, presence_penalty=0, max_new_tokens=12)))
    engine.close()
    assert via_vllm.stdout.strip() and same_text(via_vllm.stdout.rstrip("\n"), want.text)


def test_eval_backend_vllm_equals_transformers(vllm_model_dir, red_png, tmp_path):
    rows = [{"image": str(red_png), "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                      {"from": "gpt", "value": "red"}]}
            for q in ("What colour is it?", "Colour?", "Which colour is the picture?")]
    rows += [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "blue"}]}
             for q in ("What colour is the sky?", "Name a colour.")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = {}
    for backend in ("vllm", "transformers"):
        out = tmp_path / backend
        qvl("eval", str(vllm_model_dir), "--data", str(data), "--backend", backend, "--max-new-tokens", "8",
            "--batch-size", "8", "--out", str(out))
        summary = json.loads((out / "eval.json").read_text())
        assert summary["backend"] == backend and summary["results"][0]["summary"]["n"] == len(rows)
        preds[backend] = [json.loads(line)["prediction"] for line in (out / "predictions-0.jsonl").open()]
    assert len(preds["vllm"]) == len(rows)
    assert all(same_text(a, b) for a, b in zip(preds["vllm"], preds["transformers"])), preds


def test_eval_backend_vllm_refuses_choices(vllm_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "red"}]}))
    r = subprocess.run([QVL, "eval", str(vllm_model_dir), "--data", str(data), "--backend", "vllm", "--choices", "auto",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode != 0 and "--choices" in r.stderr and "Traceback" not in r.stderr
