"""bench/serve.py runs end to end on the CPU (--smoke): the real `qvl serve` in its own process, async
streaming clients, the engine-level rows and the two-turn conversation, all written to its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_serve_smoke(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--smoke", "--model", str(tiny_model_dir),
                        "--json", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["command"].startswith("python bench/serve.py --smoke") and res["versions"]["torch"] and res["date"]
    assert "qvl_src_tree" in res["versions"]  # the code that ran, for bench/provenance.py
    for phase in ("http", "engine"):
        for row in ("clients_1", "clients_4", "rate_20"):
            s = res[phase][row]
            assert s["errors"] == 0 and s["completed"] == s["requests"], (phase, row, s)
            assert s["output_tokens"] == s["requests"] * 6 and s["output_tok_s"] > 0
            assert s["ttft_p50_s"] > 0 and s["tpot_p50_s"] > 0 and s["itl_p99_s"] >= s["itl_p50_s"]
    assert set(res["http_vs_engine"]) == {"clients_1", "clients_4", "rate_20"}
    ceiling = res["staggered_ceiling"]  # from the engine's single stream, with both phases' rows against it
    assert ceiling["from"] == "engine clients_1" and set(ceiling["tok_s"]) == {"clients_1", "clients_4"}
    assert set(ceiling["http_of_ceiling"]) == set(ceiling["engine_of_ceiling"]) == {"clients_1", "clients_4"}
    for name in ("turns", "turns_jpeg"):  # the conversation about a noise PNG, and about a photo-like JPEG
        assert res[name]["turn1_ttft_s"] > 0 and res[name]["turn2_ttft_s"] > 0
        one, two = res[name]["prompt_tokens"]
        assert one < two  # turn 2: turn 1's prompt, the fixed answer and the follow-up
        turn1, turn2 = (res[name]["server"][t][-1] for t in ("turn1", "turn2"))  # the server's split of each turn
        assert turn2["stages_ms"]["total"] > 0 and "submitted->admitted" in turn2["stages_ms"]
        assert res[name]["turn2_vs_turn1_server"] > 0  # the ratio from the server's own times, the client's apart
        outside = turn2["outside_server_ms"]  # the client's part, from the server's absolute marks (one clock)
        assert outside["client->arrived"] > 0 and outside["loop->client"] >= 0  # each after its cause
        assert 0 <= outside["of which client encoding"] < outside["client->arrived"]  # the body's JSON, before it
        assert turn1["reused"]["prefix_reused_tokens"] == 0
        assert turn2["reused"]["prefix_reused_tokens"] == one  # turn 1's whole prompt, image included, kept
        # the image not encoded again, nor decoded and normalised again
        assert turn1["reused"]["vision_cache_misses"] >= 1 and turn2["reused"]["vision_cache_misses"] == 0
        assert turn2["reused"]["image_cache_hits"] == 1
    for row in ("clients_1", "clients_4", "rate_20"):  # the server's own split of the time to the first token
        split = res["server_stages"][row]
        assert split["requests"] == res["http"][row]["requests"], split
        assert split["stages"]["total"]["p50_ms"] > 0 and "submitted->admitted" in split["stages"]
    assert res["server_alive_after"] is True
    profile = res["thread_profile"]  # the extra run with the server sampling its threads
    assert profile["clients"] == 4 and profile["http"]["errors"] == 0 and profile["samples"] > 0
    assert all({"name", "cpu_s", "in", "in_qvl"} <= set(t) for t in profile["threads"])
    assert (tmp_path / "server.log").exists()


def _bench_serve():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_turn_two_sends_the_fixed_answer_and_fits_the_default_context():
    """Turn 2 re-sends the image with the fixed turn-1 answer (not the model's own, whose length depends on the
    weights): with the official checkpoints' processor its 1024x1024-image prompt fits the bench's default
    2,048-token context, and turn 1's prompt is its prefix (what the server's prefix reuse needs)."""
    from qvl.data.preprocess import encode
    from qvl.data.samples import Media, Message, Sample
    from qvl.models.build import official_processor
    from qvl.serve.media import MediaResolver
    from qvl.serve.schema import MediaRef, parse_chat

    bench = _bench_serve()
    work = bench.Workload((1024, 1024), 128, "m")
    image = work.images(1)[0]
    first, second = bench.turn_bodies(work, image)
    assert second["messages"][0] == first["messages"][0]  # the same image, sent again
    assert second["messages"][1] == {"role": "assistant", "content": bench.TURN1_ANSWER}
    assert second["messages"][2] == {"role": "user", "content": bench.FOLLOW_UP}
    assert bench.turn_bodies(work, image) == (first, second)  # nothing in it depends on a model's output

    processor, resolver = official_processor(), MediaResolver()

    def prompt(body):
        chat = parse_chat(body, {"image": 8, "video": 2})  # as the server reads it
        messages = [Message(role, [Media("image", resolver.image(p)) if isinstance(p, MediaRef) else p
                                   for p in parts]) for role, parts in chat.messages]
        return encode(Sample(messages), processor, for_generation=True).input_ids

    one, two = prompt(first), prompt(second)
    default_context = 2048  # bench/serve.py --max-model-len
    assert 1000 < len(one) < len(two) < default_context - 128, (len(one), len(two))  # 1,047 and 1,330 tokens
    assert two[:len(one)].tolist() == one.tolist()


def test_staggered_ceiling_is_the_last_arrival_plus_one_streams_time():
    """n clients 20 ms apart, 128 tokens each: the run lasts at least the last arrival plus one client's TTFT and
    127 steps, so output tok/s is at most n x 128 over that (H200 figures: 1-client TTFT 0.11 s, TPOT 5.4 ms)."""
    bench = _bench_serve()
    one = {"ttft_p50_s": 0.11, "tpot_p50_s": 0.0054}
    got = bench.staggered_ceiling(one, [1, 32, 64], 0.02, 128)
    assert got["clients_1"] == pytest.approx(128 / (0.11 + 127 * 0.0054))  # one stream's own rate
    assert got["clients_32"] == pytest.approx(32 * 128 / (31 * 0.02 + 0.11 + 127 * 0.0054))  # ~2,900 tok/s
    assert got["clients_1"] < got["clients_32"] < got["clients_64"]
    assert bench.staggered_ceiling({"ttft_p50_s": 0.1, "tpot_p50_s": None}, [1], 0.02, 128) == {}  # one token: none
    assert bench.staggered_ceiling(None, [1], 0.02, 128) == {}
