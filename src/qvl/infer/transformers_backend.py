"""The transformers backend: CPU or GPU, streams token by token, batches concurrent requests.

One worker thread owns the model. Requests wait in a queue; when several are waiting with the
same sampling settings the worker runs them as one left-padded batch (``qvl.data.collate``),
streaming each row to its own client. Nothing about one request leaks into another: each row
has its own stop/length/cancel state, and the presence penalty only sees that row's tokens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from qvl.errors import QvlError
from qvl.infer.engine import Engine, Prepared
from qvl.infer.types import Chunk, Handle, Request, SamplingParams, default_sampling, is_thinking

log = logging.getLogger("qvl.infer")
WARMUP_KEYS = 4096  # decode-step graphs captured at start-up cover contexts up to this many tokens


class PresencePenalty:
    """OpenAI/vLLM presence and frequency penalties over the generated tokens of each row.

    ``logits[t] -= presence * (t appeared) + frequency * count(t)``, applied before temperature
    and top-k/top-p (transformers runs custom processors before its samplers).
    """

    def __init__(self, prompt_len: int, presence: float, frequency: float = 0.0):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(1, generated.clamp(max=scores.shape[1] - 1),
                            torch.ones(generated.shape, dtype=scores.dtype, device=scores.device))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


@dataclass
class _Job:
    prepared: Prepared
    handle: Handle


def text_decoder(tokenizer):
    """ids -> text without special tokens: the Rust tokenizer itself when the Python wrapper would only add its
    call overhead (~4 us of ~5 per short decode; no clean-up of tokenization spaces configured)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and \
            getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class _Row:
    """Streaming state of one batch row: incremental detokenisation, stop strings, finish reason."""

    def __init__(self, job: _Job, tokenizer, eos_ids: set[int], prefix: str):
        self.job, self.tok = job, tokenizer
        self.eos = set() if job.prepared.sampling.ignore_eos else eos_ids
        self.max_new = job.prepared.sampling.max_new_tokens
        self.stops = job.prepared.sampling.stop
        self.ids: list[int] = []  # the generated tokens (EOS excluded)
        # incremental detokenisation (as vLLM's): only ids[prefix:] is decoded for each new token; ids[prefix:read]
        # is text already sent, decoded again so that the new token's text is what it adds in context
        self.prefix = self.read = 0
        self._decode = text_decoder(tokenizer)
        self.count = 0
        self.held = ""  # decoded text not sent yet: it may be the start of a stop string
        self.cut = False  # a stop string ended the text: nothing after it is sent
        self.finish: str | None = None
        if prefix:
            self._send(prefix)

    def _send(self, text: str) -> None:
        if text:
            self.job.handle.emit(Chunk(text=text))

    def _out(self, new: str, final: bool = False) -> None:
        """Send ``new`` unless it completes a stop string (then send up to it and finish); hold back a tail
        that could still become one, so a stop string split over tokens is never partly streamed."""
        if not self.stops:
            self._send(new)
            return
        text = self.held + new
        hits = [h for h in (text.find(s) for s in self.stops) if h >= 0]
        if hits:
            self._send(text[:min(hits)])
            self.held, self.finish, self.cut = "", "stop", True
            return
        keep = 0 if final else max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                                    if text.endswith(s[:k])), default=0)
        self._send(text[:len(text) - keep])
        self.held = text[len(text) - keep:]

    def push(self, token: int) -> None:
        if self.finish is not None:
            return
        self.count += 1
        if token in self.eos:
            self.finish = "stop"
            return
        self.ids.append(token)
        self._out(self._new_text())
        if self.finish is not None:
            return
        if self.job.handle.cancelled:
            self.finish = "cancelled"
        elif self.count >= self.max_new:
            self.finish = "length"

    def _new_text(self, final: bool = False) -> str:
        """The text the tokens since the last sent one add (held back while it ends in an incomplete UTF-8
        sequence, unless ``final``). O(1) per token: decoding all tokens each time cost ~34 us a token at 128."""
        decode = self._decode
        done = decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        text = decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def close(self, default: str = "length") -> None:
        if self.read < len(self.ids) and not self.cut:
            self._out(self._new_text(final=True), final=True)  # text held back for the rest of a UTF-8 sequence
        if self.held and not self.cut:
            self._out("", final=True)  # the start of a stop string that never completed
        p = self.job.prepared
        self.job.handle.emit(Chunk(finish_reason=self.finish or default, prompt_tokens=p.prompt_tokens,
                                   completion_tokens=self.count))


class _Streamer:
    """A transformers streamer that routes each new token of a batch to its row."""

    def __init__(self, rows: list[_Row]):
        self.rows, self.first = rows, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate() first pushes the prompt
            self.first = False
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            row.push(int(token))

    def end(self) -> None:
        pass


class _RowsDone:
    """Stopping criterion: a row is done when its own stream says so (stop, length, cancel)."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([r.finish is not None or r.job.handle.cancelled for r in self.rows],
                            dtype=torch.bool, device=input_ids.device)


IMAGE_CACHE_BYTES = 512 * 2**20  # processed images kept in host memory (~20 images of 1024x1024 at the 8B budget)


class TransformersEngine(Engine):
    backend = "transformers"

    def __init__(self, model, processor, name: str = "model", max_model_len: int | None = None,
                 sampling: SamplingParams | None = None, thinking: bool | None = None, max_batch_size: int = 8,
                 budget=None, fast: bool | None = None, kv_cache_gib: float | None = None, say=None,
                 vision_cache_mb: float | None = None):
        from qvl.models.tokens import token_ids

        self.model, self.processor, self.name = model, processor, name
        self.tokenizer = processor.tokenizer
        self.ids = token_ids(self.tokenizer)
        text_cfg = getattr(model.config, "text_config", model.config)
        native = int(getattr(text_cfg, "max_position_embeddings", 32768))
        self.max_model_len = min(max_model_len or native, native)
        self.thinking = is_thinking(processor, name) if thinking is None else thinking
        self.default_sampling = sampling or default_sampling(getattr(model, "generation_config", None),
                                                             self.thinking)
        self.max_batch_size = max(1, max_batch_size)
        self.budget = budget  # None: the checkpoint's own inference budgets (as training's encode)
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos) | {self.ids.im_end, self.ids.endoftext}
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self.batcher = None  # continuous batching over a slot KV cache, when the model allows it
        self.vision_cache = None
        if fast is not False:
            self._start_fast(kv_cache_gib, say or log.info, required=bool(fast), vision_cache_mb=vision_cache_mb)
        from qvl.data.packing import RopeIndex
        from qvl.infer.prepare import Preparer

        # a chat turn re-sends its images: keep them processed too (host memory; off with the vision cache)
        self.preparer = Preparer(processor, self.max_model_len, budget,
                                 rope_index=RopeIndex(model) if self.batcher is not None else None,
                                 media_keys=self.vision_cache is not None,
                                 image_cache_bytes=IMAGE_CACHE_BYTES if vision_cache_mb != 0 else 0)
        self._worker = threading.Thread(target=self._run, name="qvl-generate", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str, adapter: str | None = None, device: str | None = None, dtype=None,
             flash_attn2: bool = False, max_model_len: int | None = None, name: str | None = None,
             max_new_tokens: int | None = None, max_batch_size: int = 8, say=print, fast: bool | None = None,
             kv_cache_gib: float | None = None, vision_cache_mb: float | None = None,
             **ignored) -> TransformersEngine:
        from qvl.models.load import load

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        on_gpu = str(device).startswith("cuda")
        if flash_attn2 and not on_gpu:
            say("note: --flash-attn2 needs a GPU; using the default attention on CPU")
            flash_attn2 = False
        attn = "flash_attention_2" if flash_attn2 else ("sdpa" if on_gpu else None)
        t0 = time.time()
        m, processor = load(model, dtype=dtype, device=device, attn_implementation=attn)
        if hasattr(m, "merge_and_unload"):  # an adapter folder: merged in memory, as --adapter is (fast decode)
            m = m.merge_and_unload().eval()
        if adapter:
            m = apply_adapter(m, adapter)
        log.info("loaded %s on %s in %.1fs", model, device, time.time() - t0)
        engine = cls(m, processor, name=name or served_name(model), max_model_len=max_model_len,
                     max_batch_size=max_batch_size, fast=fast, kv_cache_gib=kv_cache_gib, say=say,
                     vision_cache_mb=vision_cache_mb)
        if max_new_tokens:
            engine.default_sampling = engine.default_sampling.replace(max_new_tokens=max_new_tokens)
        return engine

    def _start_fast(self, kv_cache_gib: float | None, say, required: bool,
                    vision_cache_mb: float | None = None) -> None:
        from qvl.data.packing import rope_index_fn
        from qvl.infer.continuous import ContinuousBatcher
        from qvl.infer.decode import DecodeModel, supports
        from qvl.infer.vision_cache import VisionCache

        why = supports(self.model)
        if why:
            if required:
                raise QvlError(f"the fast decode path cannot run this model: {why}")
            say(f"note: generating with model.generate ({why})")
            return
        slots, length = cache_shape(self.model, self.max_batch_size, self.max_model_len, kv_cache_gib)
        if length < self.max_model_len:
            say(f"context limited to {length:,} tokens: the KV cache for {slots} concurrent requests "
                f"fills the memory set aside for it (lower --max-batch-size for longer contexts)")
        self.max_model_len, self.max_batch_size = length, slots
        decoder = DecodeModel(self.model, slots, length)
        if decoder.use_graphs:  # compile and capture now: the first requests must not wait for it (~0.1 s a shape)
            t = time.time()
            decoder.warmup(max_keys=min(length, WARMUP_KEYS))
            say(f"decode step captured for {len(decoder._graphs)} batch x length shapes (up to "
                f"{min(length, WARMUP_KEYS):,} tokens; longer ones at first use) in {time.time() - t:.0f} s")
        if decoder.prefill_why_padded:
            say(f"note: prompts are prefilled as padded batches through transformers' forward "
                f"({decoder.prefill_why_padded})")
        elif decoder.compiled:  # the compiled layers meet a prefill's shapes now, not at the first request
            from qvl.infer.packed_prefill import fall_back, warm

            while decoder.prefill_impl == "packed":
                try:
                    warm(decoder)
                    break
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001 -- a step down serves instead (pieces, padded), said in the log
                    fall_back(decoder, e)
        if vision_cache_mb is None:  # a chat turn re-sends its images: keep their encoder outputs
            vision_cache_mb = 1024 if decoder.device.type == "cuda" else 256
        visual = getattr(decoder.base.model, "visual", None)
        if vision_cache_mb > 0 and visual is not None:
            self.vision_cache = VisionCache(visual, int(vision_cache_mb * 2**20))
        self.rope_index = rope_index_fn(self.model)
        self.batcher = ContinuousBatcher(
            decoder, lambda job: _Row(job, self.tokenizer, self.eos_ids, "<think>\n" if self.thinking else ""),
            self.ids.pad, self.rope_index, vision_cache=self.vision_cache)

    def cache_stats(self) -> dict:
        """What chat turns reused so far: prompt tokens not prefilled again (a kept prefix, qvl.infer.prefix), the
        vision cache's hits and misses (images and videos not encoded again) and the processed-image cache's (images
        not decoded and normalised again, qvl.infer.image_cache); {} without the fast decode path."""
        if self.batcher is None:
            return {}
        out = {"prefix_reused_tokens": self.batcher.reused_tokens}
        if self.vision_cache is not None:
            out.update(vision_cache_hits=self.vision_cache.hits, vision_cache_misses=self.vision_cache.misses)
        return out | self.preparer.cache_stats()

    def describe(self) -> str:
        how = (f"; continuous batching, {self.max_batch_size} slots, {self.batcher.decoder.prefill_impl} prefill"
               if self.batcher else "; model.generate batches")
        return super().describe() + how

    # ------------------------------------------------------------------ requests
    def prepare(self, request: Request) -> Prepared:
        return self.preparer(request)

    def submit(self, prepared: Prepared, on_chunk=None) -> Handle:
        if self._closed:
            raise QvlError("the engine is closed")
        handle = Handle(prepared.prompt_tokens, on_chunk)
        self._queue.put(_Job(prepared, handle))
        return handle

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests and wait for the worker to finish its last step: a process that exits while the
        worker is inside a torch call can abort ("terminate called without an active exception")."""
        self._closed = True
        self._queue.put(None)
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    # ------------------------------------------------------------------ worker
    def _batch_key(self, job: _Job):
        s = job.prepared.sampling
        if s.seed is not None:  # a seeded request runs alone, so its output is reproducible
            return ("seed", id(job))
        return (s.temperature, s.top_p, s.top_k, s.presence_penalty, s.frequency_penalty, s.repetition_penalty)

    def _run(self) -> None:
        if self.batcher is not None:
            with torch.inference_mode():
                self.batcher.run(self._queue)
            return
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self._queue.get()
            if job is None:
                return
            batch = [job]
            key = self._batch_key(job)
            for j in [j for j in pending if self._batch_key(j) == key][:self.max_batch_size - 1]:
                pending.remove(j)  # jobs set aside by an earlier batch can share this one
                batch.append(j)
            while len(batch) < self.max_batch_size:  # take every waiting job that can share this batch
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                if self._batch_key(nxt) == key:
                    batch.append(nxt)
                else:
                    pending.append(nxt)
            live = [j for j in batch if not j.handle.cancelled]
            for j in batch:
                if j.handle.cancelled:
                    j.handle.emit(Chunk(finish_reason="cancelled", prompt_tokens=j.prepared.prompt_tokens))
            if not live:
                continue
            try:
                self._generate(live)
            except Exception as e:  # never kill the worker: report to every client of this batch
                log.exception("generation failed")
                for j in live:
                    j.handle.emit(Chunk(finish_reason="error", error=f"{type(e).__name__}: {e}",
                                        prompt_tokens=j.prepared.prompt_tokens))

    @torch.inference_mode()
    def _generate(self, jobs: list[_Job]) -> None:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from qvl.data.collate import collate

        model = self.model
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        batch = collate([j.prepared.inputs for j in jobs], pad_id=self.ids.pad, padding_side="left")
        inputs = {}
        for k, v in batch.items():
            if k in ("pixel_values", "pixel_values_videos"):
                v = v.to(dtype)
            inputs[k] = v.to(device)
        s = jobs[0].prepared.sampling
        prompt_len = int(inputs["input_ids"].shape[1])
        prefix = "<think>\n" if self.thinking else ""
        rows = [_Row(j, self.tokenizer, self.eos_ids, prefix) for j in jobs]
        gc = GenerationConfig(
            max_new_tokens=max(j.prepared.sampling.max_new_tokens for j in jobs),
            do_sample=not s.greedy,
            temperature=s.temperature if not s.greedy else 1.0,  # neutral values, not None: generate() would
            top_p=s.top_p if not s.greedy else 1.0,  # fill None from the checkpoint's sampling config
            top_k=(s.top_k if s.top_k > 0 else 0) if not s.greedy else 0,
            repetition_penalty=s.repetition_penalty if s.repetition_penalty != 1.0 else None,
            eos_token_id=None if s.ignore_eos else (sorted(self.eos_ids) or None),
            pad_token_id=self.ids.pad,
        )
        processors = LogitsProcessorList()
        if s.presence_penalty or s.frequency_penalty:
            processors.append(PresencePenalty(prompt_len, s.presence_penalty, s.frequency_penalty))
        if s.seed is not None:
            torch.manual_seed(s.seed)
        model.generate(**inputs, generation_config=gc, logits_processor=processors,
                       stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]), streamer=_Streamer(rows))
        for r in rows:
            r.close()


def cache_shape(model, slots: int, max_model_len: int, kv_cache_gib: float | None = None) -> tuple[int, int]:
    """(slots, tokens per slot) of the decode KV cache: what ``kv_cache_gib`` holds (default: most of the free
    GPU memory, or a quarter of the free RAM up to 4 GiB on CPU). Fewer slots before a context under 8k."""
    from qvl.infer.decode import DecodeModel

    per_token = DecodeModel.cache_bytes_per_token(model)
    device = next(model.parameters()).device
    if kv_cache_gib is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = max(0.0, (free - 4 * 2**30) * 0.9)  # room for prefill activations and the graphs
        else:
            import os

            try:
                available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                available = 16 * 2**30
            budget = min(4 * 2**30, available / 4)
    else:
        budget = kv_cache_gib * 2**30
    wanted = min(max_model_len, 8192)
    while slots > 1 and budget / (slots * per_token) < wanted:
        slots //= 2
    fits = int(budget // (slots * per_token))
    length = max_model_len if fits >= max_model_len else (fits // 128 * 128 if fits >= 256 else fits)
    if length < min(64, max_model_len):
        raise QvlError(f"no memory left for a KV cache ({budget / 2**30:.1f} GiB for {slots} request(s))",
                       fix="free GPU memory, use a smaller model, or pass a larger kv_cache_gib")
    return slots, length


def served_name(model: str) -> str:
    """The id shown in /v1/models: a hub id as is, a local folder by its name."""
    from pathlib import Path

    p = Path(str(model)).expanduser()
    return p.resolve().name if p.exists() else str(model)


def adapter_info(adapter: str) -> dict:
    """adapter_config.json of a PEFT adapter folder, with a helpful error when it is not one."""
    import json
    from pathlib import Path

    cfg = Path(adapter) / "adapter_config.json"
    if not cfg.is_file():
        raise QvlError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)",
                       fix="pass the folder written by `qvl train` with LoRA (it holds adapter_config.json)")
    return json.loads(cfg.read_text())


def apply_adapter(model, adapter: str):
    """Base + LoRA adapter, merged in memory (same outputs as PeftModel, no per-token LoRA cost)."""
    from peft import PeftModel

    adapter_info(adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except Exception as e:
        raise QvlError(f"cannot apply adapter {adapter} to this base model: {type(e).__name__}: {e}",
                       fix="use the base checkpoint the adapter was trained on") from None
    log.info("applied adapter %s (merged in memory)", adapter)
    return peft_model.merge_and_unload().eval()
