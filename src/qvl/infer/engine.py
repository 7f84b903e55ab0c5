"""The engine interface every backend implements, and ``load_engine`` to pick one.

An engine turns a :class:`~qvl.infer.types.Request` into streamed :class:`~qvl.infer.types.Chunk`
objects. Work is split in two so that a server can reject a bad request with a 4xx *before* it
starts a streaming response:

* :meth:`Engine.prepare` (any thread, raises :class:`RequestError`): preprocessing with the same
  ``qvl.data.preprocess.encode`` used in training, the context-length check, max-token clipping.
* :meth:`Engine.submit` (never raises for input problems): queue it, return a :class:`Handle`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from qvl.errors import QvlError
from qvl.infer.types import Handle, Request, Result, SamplingParams


class RequestError(QvlError):
    """A problem with one request (the server answers 4xx with an OpenAI-style error body)."""

    def __init__(self, what: str, code: str = "invalid_request", param: str | None = None, status: int = 400,
                 fix: str | None = None):
        self.code, self.param, self.status = code, param, status
        super().__init__(what, fix=fix)


@dataclass
class Prepared:
    """A request after preprocessing: what the backend needs to start generating."""

    request: Request
    sampling: SamplingParams  # max_new_tokens already clipped to the context left
    prompt_tokens: int
    inputs: Any  # backend-specific (an Encoded for transformers, a prompt dict for vLLM)
    media_keys: dict | None = None  # content keys of its images/videos (the transformers vision cache)


class Engine(ABC):
    backend: str = "?"
    name: str = "model"  # the id served in /v1/models
    max_model_len: int = 0
    thinking: bool = False
    default_sampling: SamplingParams = SamplingParams()

    @abstractmethod
    def prepare(self, request: Request) -> Prepared: ...

    @abstractmethod
    def submit(self, prepared: Prepared, on_chunk=None) -> Handle: ...

    def stream(self, request: Request, on_chunk=None) -> Handle:
        return self.submit(self.prepare(request), on_chunk)

    def generate(self, request: Request) -> Result:
        return self.stream(request).result()

    def sampling(self, **overrides) -> SamplingParams:
        """The engine's defaults with per-request overrides (``None`` = keep the default)."""
        return self.default_sampling.replace(**overrides)

    def close(self) -> None:  # pragma: no cover - backends override when they hold resources
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        s = self.default_sampling
        return (f"{self.name} on {self.backend} (context {self.max_model_len:,} tokens, "
                f"{'Thinking' if self.thinking else 'Instruct'} sampling: temperature {s.temperature}, "
                f"top_p {s.top_p}, top_k {s.top_k}, presence_penalty {s.presence_penalty})")


def context_check(prompt_tokens: int, max_model_len: int, sampling: SamplingParams) -> SamplingParams:
    """Refuse prompts that leave no room to answer; clip max_new_tokens to the context left."""
    room = max_model_len - prompt_tokens
    if room < 1:
        raise RequestError(
            f"the prompt is {prompt_tokens} tokens (after vision expansion) but the context is {max_model_len}",
            code="context_length_exceeded", param="messages",
            fix="send fewer or smaller images/videos or a shorter conversation")
    if sampling.max_new_tokens > room:
        sampling = sampling.replace(max_new_tokens=room)
    return sampling


def load_engine(model: str, backend: str = "transformers", **kwargs) -> Engine:
    """An engine for ``model`` (folder or hub id). ``backend``: transformers (alias hf) or vllm."""
    backend = {"hf": "transformers"}.get(backend, backend)
    if backend == "transformers":
        from qvl.infer.transformers_backend import TransformersEngine

        return TransformersEngine.load(model, **kwargs)
    if backend == "vllm":
        from qvl.infer.vllm_backend import VllmEngine

        return VllmEngine.load(model, **kwargs)
    raise QvlError(f"unknown backend {backend!r}", fix="use --backend transformers (alias hf) or vllm")
