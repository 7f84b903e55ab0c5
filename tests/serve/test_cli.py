"""`qvl infer`, `qvl chat` and `qvl serve` command lines (serve: flags only; the server is tested elsewhere)."""

from __future__ import annotations

import pytest
from serve_helpers import make_mp4, png_bytes
from typer.testing import CliRunner

from qvl.cli.main import app


def test_infer_image_and_video(tiny_model_dir, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes())
    mp4 = make_mp4(tmp_path / "v.mp4")
    r = CliRunner().invoke(app, ["infer", "--model", str(tiny_model_dir), "--image", str(img), "--video", mp4,
                                 "--max-new-tokens", "5", "--temperature", "0", "what is shown?"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip()


def test_infer_errors_are_friendly(tiny_model_dir, tmp_path):
    r = CliRunner().invoke(app, ["infer", "--model", str(tiny_model_dir), "--image", str(tmp_path / "nope.png"), "q"])
    assert r.exit_code == 2 and "image file not found" in r.output
    r = CliRunner().invoke(app, ["infer", "q"])
    assert r.exit_code == 2 and "--model" in r.output


def test_chat_session(tiny_model_dir, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes())
    lines = [f"/image {img}", "what colour?", "/image /missing.png", "and now?", "/reset", "hello", "/quit"]
    r = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"],
                           input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("qvl> ") == 3
    assert "(attached image" in r.output and "(conversation cleared)" in r.output
    assert "image file not found" in r.output


@pytest.fixture
def captured(monkeypatch):
    import qvl.serve.app as serve_app

    got = {}
    monkeypatch.setattr(serve_app, "run_server", lambda engine, settings, say=print: got.update(
        engine=engine, settings=settings))
    return got


def test_serve_defaults_bind_localhost(tiny_model_dir, captured):
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    s = captured["settings"]
    assert s.host == "127.0.0.1" and s.port == 7860 and s.api_key is None and s.allowed_media_dir is None
    assert s.allow_remote_media and not s.allow_private_media_urls  # public URLs only (SSRF)
    assert captured["engine"].backend == "transformers"
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--allow-private-media-urls"])
    assert r.exit_code == 0, r.output
    assert captured["settings"].allow_private_media_urls


def test_serve_accepts_web_demo_flags(tiny_model_dir, captured):
    """The official web_demo_mm.py command line works unchanged after swapping the entry point."""
    argv = ["serve", "-c", str(tiny_model_dir), "--backend", "hf", "--server-name", "0.0.0.0", "--server-port", "9999",
            "--cpu-only", "--flash-attn2", "--share", "--inbrowser", "--gpu-memory-utilization", "0.7",
            "--tensor-parallel-size", "1", "--max-model-len", "4096"]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    s, e = captured["settings"], captured["engine"]
    assert (s.host, s.port, s.share, s.inbrowser) == ("0.0.0.0", 9999, True, True)
    assert e.max_model_len == 4096 and str(next(e.model.parameters()).device) == "cpu"
    r = CliRunner().invoke(app, ["serve", "--checkpoint-path", str(tiny_model_dir), "--limit-mm-per-prompt",
                                 "image=3,video=0", "--api-key", "k", "--allowed-media-dir", "/tmp"])
    assert r.exit_code == 0, r.output
    s = captured["settings"]
    assert s.limit_mm_per_prompt == {"image": 3, "video": 0} and s.api_key == "k" and s.allowed_media_dir == "/tmp"


def test_serve_bad_flags(tiny_model_dir, captured):
    r = CliRunner().invoke(app, ["serve", "-c", str(tiny_model_dir), "--limit-mm-per-prompt", "audio=2"])
    assert r.exit_code == 2 and "limit-mm-per-prompt" in r.output
    r = CliRunner().invoke(app, ["serve", "-c", str(tiny_model_dir), "--backend", "vllm", "--cpu-only"])
    assert r.exit_code == 2 and "cpu-only" in r.output
    r = CliRunner().invoke(app, ["serve", "-c", str(tiny_model_dir), "--backend", "tgi"])
    assert r.exit_code == 2 and "unknown backend" in r.output


def test_banner_warns_on_open_bind(tiny_engine):
    from qvl.serve.app import ServeSettings, banner

    text = banner(tiny_engine, ServeSettings(host="0.0.0.0"))
    assert "warning" in text and "--api-key" in text
    assert "warning" not in banner(tiny_engine, ServeSettings())


def test_banner_names_the_http_stack(tiny_engine, monkeypatch):
    """uvicorn's C loop and parser when installed (the serve extra brings them); otherwise the fix is said."""
    import importlib.util
    import sys

    from qvl.serve.app import ServeSettings, banner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    monkeypatch.setattr(sys, "platform", "linux")
    text = banner(tiny_engine, ServeSettings())  # httptools still parses: only the loop's fix is said
    assert "asyncio (`pip install uvloop` is faster) + httptools" in text
    monkeypatch.setattr(sys, "platform", "win32")  # no uvloop there: nothing to install
    assert "HTTP       asyncio + httptools" in banner(tiny_engine, ServeSettings())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("uvloop", "httptools")
                        else real(name, *a))
    assert "HTTP       uvloop + httptools" in banner(tiny_engine, ServeSettings())


def test_preprocess_workers_flag_and_banner(tiny_model_dir, tiny_engine, captured):
    """--preprocess-workers reaches the settings (default 0: in the server's process); the banner says where
    requests are prepared."""
    from qvl.infer.prepare_pool import PreparePool
    from qvl.serve.app import ServeSettings, banner

    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--cpu-only"])
    assert r.exit_code == 0 and captured["settings"].preprocess_workers == 0, r.output
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--cpu-only", "--preprocess-workers", "2"])
    assert r.exit_code == 0 and captured["settings"].preprocess_workers == 2, r.output
    assert "preprocess in the server's process, 2 at a time" in banner(tiny_engine, ServeSettings())
    pool = PreparePool(tiny_engine.preparer, 1)
    try:
        assert "preprocess 1 worker process (started in" in banner(tiny_engine, ServeSettings(), pool)
    finally:
        pool.close()
    from serve_helpers import ScriptedEngine  # no preparer, as the vLLM backend

    assert "--preprocess-workers is for the transformers backend" in banner(ScriptedEngine("hi"),
                                                                         ServeSettings(preprocess_workers=2))
    assert "preprocess" not in banner(ScriptedEngine("hi"), ServeSettings())


def test_serve_vision_cache_flag(tiny_model_dir, captured):
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--cpu-only"])
    assert r.exit_code == 0, r.output
    assert captured["engine"].vision_cache is not None  # on by default with the fast decode path
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--cpu-only", "--vision-cache-mb", "0"])
    assert r.exit_code == 0, r.output
    assert captured["engine"].vision_cache is None
