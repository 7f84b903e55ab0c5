"""`qvl merge` round trip and `--adapter` serving, with a LoRA adapter made by peft on the tiny model."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from qvl.cli.main import app
from qvl.data.samples import Message
from qvl.infer.merge import _logits, probe_inputs
from qvl.infer.types import Request
from qvl.infer.vllm_backend import adapter_touches_vision


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from qvl.models.load import load_model

    model = load_model(tiny_model_dir)
    # language model attention + MLP, vision tower attention and the merger: the parts vLLM would drop too
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=r".*(q_proj|v_proj|down_proj|visual\.blocks\.\d+\.attn\.qkv|merger\.linear_fc1)")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, cfg)
    out = tmp_path_factory.mktemp("adapters") / "lora"
    peft_model.save_pretrained(out)
    return out


def test_merge_round_trip(tiny_model_dir, adapter_dir, tmp_path):
    from peft import PeftModel

    from qvl.models.load import load

    out = tmp_path / "merged"
    r = CliRunner().invoke(app, ["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "verified: max |logit diff|" in r.output
    for f in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
              "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    # independent check: merged == base + adapter, and the adapter changes the logits
    base, processor = load(tiny_model_dir)
    inputs = probe_inputs(processor)
    plain = _logits(base, inputs)
    with_adapter = _logits(PeftModel.from_pretrained(base, str(adapter_dir)), inputs)
    merged = _logits(load(out)[0], inputs)
    assert (with_adapter - plain).abs().max() > 1e-3
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)
    assert adapter_touches_vision(adapter_dir)

    # the merged folder serves, and --adapter on the base serves the same model
    from qvl.infer.transformers_backend import TransformersEngine

    e1 = TransformersEngine.load(str(out), max_batch_size=1)
    e2 = TransformersEngine.load(str(tiny_model_dir), adapter=str(adapter_dir), max_batch_size=1)
    req = lambda e: Request([Message("user", ["hello"])], e.sampling(temperature=0, max_new_tokens=6))  # noqa: E731
    a, b = e1.generate(req(e1)), e2.generate(req(e2))
    assert a.text == b.text and a.completion_tokens >= 1
    e1.close()
    e2.close()


def test_merge_refuses_existing_and_bad_adapter(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep me")
    r = CliRunner().invoke(app, ["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir),
                                 "--out", str(out)])
    assert r.exit_code == 2 and "not empty" in r.output and (out / "x").read_text() == "keep me"
    r = CliRunner().invoke(app, ["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path),
                                 "--out", str(tmp_path / "m2")])
    assert r.exit_code == 2 and "adapter_config.json" in r.output
