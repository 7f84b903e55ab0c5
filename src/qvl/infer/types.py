"""Request, sampling and streaming types shared by every inference backend and the server.

Sampling defaults come from the checkpoint's ``generation_config.json`` when it sets sampling
values, else from the Qwen3-VL recommendations (model cards / QwenLM/Qwen3-VL#1825):

* Instruct: top_p 0.8, top_k 20, temperature 0.7, presence_penalty 1.5
* Thinking: top_p 0.95, top_k 20, temperature 0.6, presence_penalty 0

``generation_config.json`` never carries ``presence_penalty`` (transformers has no such
setting), so it always comes from the recommendation for the model's variant. qvl applies it
itself (:class:`qvl.infer.transformers_backend.PresencePenalty`), which is what stops the endless
repetition loops users report (#1611, #1825) without breaking tables as ``repetition_penalty`` does.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

from qvl.data.samples import Message
from qvl.errors import QvlError

INSTRUCT_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5}
THINKING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "presence_penalty": 0.0}
DEFAULT_MAX_NEW_TOKENS = 1024  # the official demo's value


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20  # 0 or -1: off
    presence_penalty: float = 1.5
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past end-of-turn tokens (benchmarks; vLLM has the same switch)

    def __post_init__(self):
        checks = (
            ("temperature", 0 <= self.temperature <= 100, "between 0 and 100 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= -1, "-1, 0 (off) or a positive integer"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "between -2 and 2"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "between -2 and 2"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 10, "in (0, 10]"),
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            # torch.manual_seed / vLLM take a 64-bit seed: a larger one failed inside generation (a 500)
            ("seed", self.seed is None or -2**63 <= self.seed < 2**63, "between -2**63 and 2**63 - 1"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise QvlError(f"{name}={getattr(self, name)!r} is out of range", fix=f"use a value {rule}")

    @property
    def greedy(self) -> bool:
        # vLLM's epsilon: a temperature like 1e-300 overflowed the logits to inf and failed generation
        return self.temperature < 1e-5

    def replace(self, **overrides) -> SamplingParams:
        """A copy with the given fields changed; ``None`` values are ignored (= keep the default)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise QvlError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in clean:
            stop = clean["stop"]
            clean["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        return dataclasses.replace(self, **clean)


def is_thinking(processor, name: str = "") -> bool:
    """Thinking checkpoints open ``<think>`` in the generation prompt (or say so in their name)."""
    if "thinking" in str(name).lower():
        return True
    try:
        prompt = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False,
            add_generation_prompt=True)
    except Exception:
        return False
    return prompt.rstrip().endswith("<think>")


def default_sampling(generation_config=None, thinking: bool = False,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> SamplingParams:
    """Checkpoint generation config first, Qwen3-VL recommendations for what it does not set."""
    values = dict(THINKING_DEFAULTS if thinking else INSTRUCT_DEFAULTS)
    gc = generation_config
    if gc is not None and getattr(gc, "do_sample", False):
        for key in ("temperature", "top_p", "top_k"):
            v = getattr(gc, key, None)
            if v is not None:
                values[key] = v
        rp = getattr(gc, "repetition_penalty", None)
        if rp is not None:
            values["repetition_penalty"] = float(rp)
    elif gc is not None and getattr(gc, "do_sample", None) is False and _explicit_greedy(gc):
        values["temperature"] = 0.0
    return SamplingParams(max_new_tokens=max_new_tokens, **values)


def _explicit_greedy(gc) -> bool:
    """A generation config that explicitly asks for greedy decoding (do_sample false, saved on purpose)."""
    try:
        return "do_sample" in gc.to_diff_dict()
    except Exception:
        return False


@dataclass
class Request:
    """One generation: the conversation so far (ending with a user turn) and sampling settings."""

    messages: list[Message]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass
class Chunk:
    """A piece of streamed output. The last chunk of a generation has ``finish_reason`` set."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Handle:
    """A running generation: iterate it for chunks; ``cancel()`` stops it at the next token.

    The producer (a backend worker) calls :meth:`emit`; consumers either iterate (a thread-safe
    queue, for the CLI) or pass ``on_chunk`` (for the async server, which forwards into its loop).
    """

    def __init__(self, prompt_tokens: int = 0, on_chunk=None):
        import queue

        self.prompt_tokens = prompt_tokens
        self._cancel = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._on_chunk = on_chunk

    def emit(self, chunk: Chunk) -> None:
        if self._on_chunk is not None:
            self._on_chunk(chunk)
        else:
            self._queue.put(chunk)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self):
        if self._on_chunk is not None:
            raise RuntimeError("this handle delivers chunks to its callback")
        while True:
            chunk = self._queue.get()
            yield chunk
            if chunk.finish_reason is not None:
                return

    def result(self) -> Result:
        parts, last = [], Chunk()
        for chunk in self:
            parts.append(chunk.text)
            last = chunk
        if last.finish_reason == "error":
            raise QvlError(f"generation failed: {last.error}")
        return Result("".join(parts), last.finish_reason or "stop", last.prompt_tokens, last.completion_tokens)
