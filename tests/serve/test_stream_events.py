"""The streaming fast paths of the server equal the plain ones: content events byte for byte, and the relay
delivers every chunk, in order, to its own queue, from any number of producer threads."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from qvl.infer.types import Chunk
from qvl.serve.app import ContentEvents, Relay


def _event(delta, finish=None):
    obj = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m\"odel",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@pytest.mark.parametrize("text", ["hello", " ", 'say "hi"\n\\', "\x00\x1f", "日本語 🙂", "\u2028", "}\"]}"])
def test_content_events_equal_the_plain_event(text):
    assert ContentEvents(_event)(text) == _event({"content": text})


def test_relay_delivers_every_chunk_in_order():
    async def main():
        relay = Relay(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(6)]

        def produce(k):
            for i in range(3000):
                relay.put(queues[k], Chunk(text=str(i)))
            relay.put(queues[k], Chunk(finish_reason="length"))

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(len(queues))]
        for t in threads:
            t.start()
        got = []
        for q in queues:
            texts = []
            while True:
                c = await asyncio.wait_for(q.get(), 30)
                if c.finish_reason:
                    break
                texts.append(c.text)
            got.append(texts)
        for t in threads:
            t.join()
        return got

    for texts in asyncio.run(main()):
        assert texts == [str(i) for i in range(3000)]
