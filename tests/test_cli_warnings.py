"""What `qvl chat`, `qvl infer` and `qvl train` print on a CPU with the tiny model is ours: no library deprecation
warnings, no library notices the user cannot act on (qvl.utils.library_warnings); real warnings still pass."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "train"))
from train_helpers import make_colour_data  # noqa: E402

from qvl.utils.library_warnings import LOG_MESSAGES, quiet_library_noise  # noqa: E402

# what a library's deprecation or self-talk looks like on the screen
NOISE = re.compile(r"deprecated|FutureWarning|DeprecationWarning|UserWarning|warnings\.warn\(|Dynamo detected|"
                   r"Setting accelerator to CPU|No CUDA runtime is found|\[transformers\]", re.IGNORECASE)


def run_qvl(args: list[str], stdin: str = "", cwd: Path | None = None) -> str:
    """The `qvl` command as a user runs it (its entry point, default warning filters); stdout + stderr."""
    p = subprocess.run([sys.executable, "-c", "import sys; from qvl.cli.main import app; sys.exit(app())", *args],
                       input=stdin, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout + p.stderr


def assert_quiet(output: str) -> None:
    noisy = [line for line in output.splitlines() if NOISE.search(line)]
    assert not noisy, "library warnings reached the screen:\n" + "\n".join(noisy)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


@pytest.mark.slow
def test_infer_prints_no_library_warnings(tiny_model_dir, image):
    assert_quiet(run_qvl(["infer", "-m", str(tiny_model_dir), "--image", str(image), "--max-new-tokens", "6",
                          "What colour is this?"]))


@pytest.mark.slow
def test_chat_prints_no_library_warnings(tiny_model_dir):
    out = run_qvl(["chat", "-m", str(tiny_model_dir), "--max-new-tokens", "6"], stdin="hello\nagain\n/quit\n")
    assert out.count("qvl>") == 2
    assert_quiet(out)


@pytest.mark.slow
def test_train_prints_no_library_warnings(tiny_model_dir, tmp_path):
    import torch

    data = make_colour_data(tmp_path / "data", 8)
    config = tmp_path / "run.yaml"
    # on a GPU, bf16 takes the packed rows' varlen path inside the compiled layers (where dynamo once warned)
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_use: {data}\noutput_dir: {tmp_path / 'run'}\n"
                      "tune_mm_llm: true\nlora_enable: true\ngradient_checkpointing: true\nmax_steps: 2\n"
                      "per_device_train_batch_size: 2\nreport_to: none\nmax_pixels: 4096\nmin_pixels: 4096\n"
                      f"bf16: {str(torch.cuda.is_available()).lower()}\n")
    out = run_qvl(["train", str(config)])
    assert "done: 2 steps" in out
    assert_quiet(out)


def test_only_the_listed_library_messages_are_dropped(capsys):
    """The filters drop the listed notices and nothing else: a real warning from the same logger still shows."""
    quiet_library_noise()
    quiet_library_noise()  # idempotent: one filter per message
    for name, (start, _why) in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        assert len(logger.filters) == len({f.prefix for f in logger.filters})
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        try:
            logger.warning(start + " (the notice)")
            logger.warning("something the user should see")
        finally:
            logger.removeHandler(handler)
        assert [r.getMessage() for r in records] == ["something the user should see"]
    with warnings.catch_warnings(record=True) as caught:
        quiet_library_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("a real FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["a real FutureWarning"]
