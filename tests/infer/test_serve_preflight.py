"""Serve-side memory preflight without vLLM or a GPU (the card is given as gpu_mem)."""

from __future__ import annotations

import pytest

from qvl.errors import QvlError
from qvl.infer.preflight import check_serve
from qvl.infer.vllm_backend import planned_context


def config_8b() -> dict:
    from qvl.models.build import official_config

    return official_config("8B").to_dict()


def test_vllm_uses_the_planners_largest_context():
    from qvl.plan import preflight_serve

    lines = []
    n = planned_context("8B", config_8b(), None, 0.9, gpu_mem="24GiB", say=lines.append)
    assert n == preflight_serve("8B", gpu_mem="24GiB").settings["max_model_len"]
    assert 4096 <= n < 262_144 and n % 1024 == 0
    assert len(lines) == 1 and "does not fit; using" in lines[0] and "\n" not in lines[0]
    assert planned_context("8B", config_8b(), 32_768, 0.9, gpu_mem="80GiB", say=lines.append) == 32_768


def test_vllm_context_capped_at_the_models_own():
    cfg = config_8b()
    cfg["text_config"]["max_position_embeddings"] = 40_960
    assert planned_context("8B", cfg, None, 0.9, gpu_mem="80GiB", say=lambda *_: None) == 40_960


def test_vllm_refuses_when_nothing_fits():
    with pytest.raises(QvlError) as e:
        check_serve("8B", backend="vllm", gpu_mem="12GiB", say=lambda *_: None)
    assert "does not fit" in e.value.what and "--tensor-parallel-size" in e.value.fix


def test_vllm_falls_back_when_the_planner_cannot_read_the_model(tmp_path):
    lines = []
    n = planned_context(tmp_path / "nowhere" / "model", config_8b(), None, 0.7, gpu_mem="48GiB", say=lines.append)
    assert "skipped" in lines[0] and "context lowered" in lines[1]
    assert 2048 <= n < 262_144


def test_transformers_warns_never_refuses():
    lines = []
    fit = check_serve("2B", backend="transformers", max_model_len=8192, gpu_mem="24GiB", say=lines.append)
    assert fit.fits and fit.max_model_len is None and lines[0].startswith("memory preflight (transformers)")
    lines = []
    big = check_serve("8B", backend="transformers", gpu_mem="24GiB", say=lines.append)
    assert big.fits is False and lines[0].startswith("warning:") and "does not fit" in lines[0]
    assert "--max-model-len" in lines[0]
    small = check_serve("8B", backend="hf", gpu_mem="12GiB", say=lambda *_: None)  # weights alone do not fit
    assert small.fits is False and "even short requests" in small.message
    sized = check_serve("8B", backend="transformers", gpu_mem="24GiB", max_num_seqs=32, sized_cache=True,
                        say=lambda *_: None)  # the fast path sizes its cache: a note, not a warning
    assert sized.fits is False and not sized.message.startswith("warning") and "sized to the free memory" in sized.message


def test_no_card_skips(monkeypatch):
    monkeypatch.delenv("QVL_GPU_MEM", raising=False)
    monkeypatch.delenv("QVL_GPU", raising=False)
    lines = []
    assert check_serve("8B", say=lines.append).fits is None
    assert lines == ["memory preflight skipped: no CUDA device"]


def test_cli_engine_prints_the_transformers_verdict(tiny_model_dir, monkeypatch, capsys):
    import qvl.cli.main  # noqa: F401  (registers the commands; importing serve_cmd first is circular)
    from qvl.cli.serve_cmd import _engine

    monkeypatch.setenv("QVL_GPU_MEM", "8GiB")
    engine = _engine(str(tiny_model_dir), "transformers", None, False, None, None, False, 4096, 8)
    err = capsys.readouterr().err
    assert "memory preflight (transformers): 4,096-token context x 8 requests: fits" in err
    assert engine is not None
