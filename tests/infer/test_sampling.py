"""Sampling defaults (generation config, else Qwen3-VL recommendations), overrides, presence penalty."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from qvl.errors import QvlError
from qvl.infer.transformers_backend import PresencePenalty
from qvl.infer.types import SamplingParams, default_sampling, is_thinking


def test_defaults_without_generation_config():
    s = default_sampling(None, thinking=False)
    assert (s.temperature, s.top_p, s.top_k, s.presence_penalty) == (0.7, 0.8, 20, 1.5)
    t = default_sampling(None, thinking=True)
    assert (t.temperature, t.top_p, t.top_k, t.presence_penalty) == (0.6, 0.95, 20, 0.0)


def test_generation_config_wins_presence_penalty_from_recommendation():
    gc = GenerationConfig(do_sample=True, temperature=0.3, top_p=0.5, top_k=7)
    s = default_sampling(gc, thinking=False)
    assert (s.temperature, s.top_p, s.top_k, s.presence_penalty) == (0.3, 0.5, 7, 1.5)
    assert default_sampling(gc, thinking=True).presence_penalty == 0.0


def test_unset_generation_config_uses_recommendations():
    s = default_sampling(GenerationConfig(), thinking=True)
    assert (s.temperature, s.top_p) == (0.6, 0.95)


def test_tiny_checkpoint_defaults(tiny):
    model, processor = tiny
    s = default_sampling(model.generation_config, is_thinking(processor, "tiny"))
    assert (s.temperature, s.top_p, s.top_k, s.presence_penalty) == (0.7, 0.8, 20, 1.5)


class _Tok:
    def __init__(self, prompt):
        self.prompt = prompt

    def apply_chat_template(self, *a, **k):
        return self.prompt


class _Proc:
    def __init__(self, prompt):
        self.tokenizer = _Tok(prompt)


def test_thinking_detection():
    assert is_thinking(_Proc("<|im_start|>assistant\n<think>\n"))
    assert not is_thinking(_Proc("<|im_start|>assistant\n"))
    assert is_thinking(_Proc("<|im_start|>assistant\n"), "Qwen/Qwen3-VL-8B-Thinking")


def test_overrides_and_validation():
    s = SamplingParams().replace(temperature=0.1, top_k=None, stop="END")
    assert s.temperature == 0.1 and s.top_k == 20 and s.stop == ("END",)
    assert SamplingParams(temperature=0).greedy
    with pytest.raises(QvlError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(QvlError, match="unknown"):
        SamplingParams().replace(nucleus=0.3)


def test_presence_penalty_only_generated_tokens():
    scores = torch.zeros(2, 10)
    ids = torch.tensor([[1, 2, 3, 3], [1, 2, 5, 9]])  # prompt = first 2 tokens
    out = PresencePenalty(prompt_len=2, presence=1.5, frequency=0.25)(ids, scores.clone())
    assert out[0, 3] == pytest.approx(-1.5 - 0.5)  # present twice
    assert out[0, 1] == 0 and out[0, 2] == 0  # prompt tokens are not penalised
    assert out[1, 5] == pytest.approx(-1.75) and out[1, 9] == pytest.approx(-1.75)
    assert out[1, 3] == 0  # rows are independent
    assert torch.equal(PresencePenalty(4, 1.5)(ids, scores.clone()), scores)  # nothing generated yet


def test_seed_must_fit_64_bits():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    with pytest.raises(QvlError, match="seed"):
        SamplingParams().replace(seed=10**30)
