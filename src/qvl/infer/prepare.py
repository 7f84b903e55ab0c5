"""A request's host work before the transformers engine sees it: chat template, tokenizer, image processor, the
context check, mRoPE positions and media content keys.

:class:`Preparer` holds what that work needs and nothing of the model's weights, so it pickles: with
``--preprocess-workers N``, ``qvl serve`` runs copies of it in worker processes (:mod:`qvl.infer.prepare_pool`), off
the interpreter the engine's thread and the event loop share. Each copy keeps its own processed-image cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl.data.preprocess import TooLong, encode_prompt
from qvl.data.samples import Sample
from qvl.errors import QvlError
from qvl.infer.engine import Prepared, RequestError, context_check
from qvl.infer.types import Request


@dataclass
class Preparer:
    processor: object
    max_model_len: int
    budget: object = None  # a VisionBudget, or None: the checkpoint's own inference budgets (as training's encode)
    rope_index: object = None  # positions computed here (the fast decode path), or None: by the engine
    media_keys: bool = False  # content keys for the engine's vision cache
    image_cache_bytes: int = 0  # processed images kept by source (qvl.infer.image_cache); 0: none

    def __post_init__(self):
        from qvl.infer.image_cache import ProcessedImages

        self.image_cache = ProcessedImages(self.image_cache_bytes) if self.image_cache_bytes else None

    def __getstate__(self) -> dict:  # a copy starts with an empty cache of its own (the cache holds a lock)
        return {k: v for k, v in self.__dict__.items() if k != "image_cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __call__(self, request: Request) -> Prepared:
        if not request.messages or request.messages[-1].role != "user":
            raise RequestError("the last message must be a user message", param="messages")
        sample = Sample(request.messages, origin=request.request_id)
        try:
            enc = encode_prompt(sample, self.processor, budget=self.budget, max_length=self.max_model_len,
                                images=self.image_cache)
        except TooLong as e:
            raise RequestError(
                f"the prompt is {e.length} tokens (after vision expansion) but the context is {e.max_length}",
                code="context_length_exceeded", param="messages",
                fix="send fewer or smaller images/videos or a shorter conversation") from None
        except RequestError:
            raise
        except QvlError as e:
            raise RequestError(e.what, code="invalid_media", param="messages", fix=e.fix) from None
        sampling = context_check(len(enc), self.max_model_len, request.sampling)
        keys = None
        if self.rope_index is not None:  # the prefill's host work, done here (the caller's thread), not by the engine
            from qvl.data.packing import sample_positions
            from qvl.infer.vision_cache import media_keys

            enc.positions = sample_positions(enc, self.rope_index)
            keys = media_keys(enc) if self.media_keys else None
        return Prepared(request, sampling, len(enc), enc, keys)

    def cache_stats(self) -> dict:
        """The processed-image cache's hits and misses so far ({} without one)."""
        c = self.image_cache
        return {} if c is None else {"image_cache_hits": c.hits, "image_cache_misses": c.misses}
