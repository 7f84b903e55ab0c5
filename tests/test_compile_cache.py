"""qvl.utils.compile_cache: torch.compile's caches kept under ~/.cache/qvl unless the user chose a folder."""

from __future__ import annotations

import os
import subprocess
import sys

from qvl.utils.compile_cache import ENV, keep_compiled_code


def test_the_cache_goes_under_xdg_cache_home_and_a_users_choice_stays(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert keep_compiled_code() == str(tmp_path / "cache" / "qvl" / "torch-compile")
    assert os.environ[ENV] == str(tmp_path / "cache" / "qvl" / "torch-compile")
    assert (tmp_path / "cache" / "qvl" / "torch-compile").is_dir()
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert keep_compiled_code() == str(tmp_path / "mine")


def test_an_unwritable_home_leaves_torchs_default(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert keep_compiled_code() is None and ENV not in os.environ


def test_inductor_reads_the_folder_the_cli_sets(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop(ENV, None)
    code = "import qvl.cli.main; from torch._inductor.runtime.cache_dir_utils import cache_dir; print(cache_dir())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / "qvl" / "torch-compile")
