import hashlib
import json
import subprocess
import sys

import torch

from qvl.models import tokens as T
from qvl.models.build import build_tiny


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_build_is_deterministic_and_complete(tiny_model_dir, tmp_path):
    again = build_tiny(tmp_path / "again")
    assert _hashes(tiny_model_dir) == _hashes(again.path)
    names = set(_hashes(tiny_model_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= names
    assert "processor_config.json" in names or "preprocessor_config.json" in names


def test_tiny_loads_offline_with_auto_classes(tiny_model_dir):
    """A fresh interpreter with HF_HUB_OFFLINE=1 loads it with the Auto classes users call."""
    code = f"""
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
m = AutoModelForImageTextToText.from_pretrained({str(tiny_model_dir)!r})
p = AutoProcessor.from_pretrained({str(tiny_model_dir)!r})
print(type(m).__name__, type(p).__name__, type(p.image_processor).__name__, type(p.video_processor).__name__,
      p.image_processor.patch_size)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen2VLImageProcessor",
                   "Qwen3VLVideoProcessor", "16"]


def test_tokenizer_has_qwen_specials_in_qwen_order(tiny_processor):
    tok = tiny_processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t, _ in T.ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "Hello world, 123 bbox_2d"
    assert tok.decode(tok.encode(text)) == text


def test_config_token_ids_match_the_tokenizer(tiny_model_dir, tiny_processor):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    ids = T.token_ids(tiny_processor.tokenizer)
    assert cfg["model_type"] == "qwen3_vl"
    assert (cfg["image_token_id"], cfg["video_token_id"]) == (ids.image_pad, ids.video_pad)
    assert (cfg["vision_start_token_id"], cfg["vision_end_token_id"]) == (ids.vision_start, ids.vision_end)
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert ids.im_end in gen["eos_token_id"]


def test_chat_template_renders_chatml_with_vision_placeholders(tiny_processor):
    msgs = [{"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}, {"type": "video"}]},
            {"role": "assistant", "content": "A"}]
    text = tiny_processor.tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q"
                    "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")
    prompt = tiny_processor.tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_forward_backward_generate(tiny):
    model, processor = tiny
    from PIL import Image
    img = Image.new("RGB", (224, 224), (255, 0, 0))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    text = processor.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[img], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 4 or processor.tokenizer.eos_token_id in gen[0].tolist()
