"""profile_steps: torch.profiler over chosen steps of a run, written to the run folder; the steps it slows are not
counted as steady ones."""

from __future__ import annotations

import gzip
import json

import pytest

from qvl.errors import QvlError
from qvl.train.loop import train
from qvl.train.profile import busy_line, parse_steps
from qvl.train.track import read_metrics


def test_steps_are_one_or_a_range_counted_from_one():
    assert parse_steps("12") == (12, 12) and parse_steps(" 3-5 ") == (3, 5)
    for bad in ("0", "5-3", "a", "2-", "-1"):
        with pytest.raises(QvlError, match="profile_steps") as e:
            parse_steps(bad)
        assert "profile_steps=12-14" in str(e.value)


def test_a_bad_range_stops_the_config(make_cfg):
    with pytest.raises(QvlError, match="profile_steps"):
        make_cfg(profile_steps="ten")
    assert make_cfg(profile_steps=12).profile_steps == 12  # a YAML number


def test_kernel_time_counts_the_device_events_once():
    """A kernel's time shows in its own device event and again in the operator that launched it (and a
    user-annotated range): only the device's own, unannotated events count."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from qvl.train.profile import kernel_seconds

    events = [SimpleNamespace(device_type=DeviceType.CPU, is_user_annotation=False, self_device_time_total=3e6),
              SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=2e6),
              SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=True, self_device_time_total=2e6)]
    assert kernel_seconds(events) == 2.0


def test_a_resumed_run_profiles_what_is_left_and_says_what_it_missed(tmp_path):
    from qvl.train.profile import StepProfiler

    said = []
    inside = StepProfiler((3, 6), tmp_path, "cpu", said.append, start_step=4)
    assert not inside.covers(5)
    inside.begin(5)  # the first step this run makes
    assert inside.covers(5) and inside.covers(7) and not inside.covers(4)
    inside.end(6)
    assert (tmp_path / "profile.txt").read_text().startswith("profile_steps 5-6: 2 step(s)")
    past = StepProfiler((3, 6), tmp_path, "cpu", said.append, start_step=8)
    past.close()
    assert said[-1] == "profile_steps 3-6: the run resumed after step 6"


def test_busy_line_says_when_the_host_is_the_slow_side():
    assert "host is the slow side" in busy_line(1.0, 4.0, 2) and "(25%)" in busy_line(1.0, 4.0, 2)
    assert "slow side" not in busy_line(3.8, 4.0, 2) and "2.000 s each" in busy_line(3.8, 4.0, 2)


def test_profiled_steps_write_a_profile_and_leave_the_steady_rate(make_cfg, tmp_path):
    said = []
    cfg = make_cfg(output_dir=str(tmp_path / "run"), max_steps=5, profile_steps="2-3")
    train(cfg, log=said.append)
    run = tmp_path / "run"
    text = (run / "profile.txt").read_text()
    assert text.startswith("profile_steps 2-3: 2 step(s) in ") and "by host time (self):" in text
    with gzip.open(run / "profile_trace.json.gz") as f:
        assert json.load(f)["traceEvents"]
    assert not (run / "profile_trace.json").exists()
    assert any(line.startswith("profile: ") for line in said), said
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert [s for s, r in rows.items() if "profiled" in (r["warm_up"] or "")] == [2, 3, 4]  # 4 waited for the write
    assert not rows[5]["warm_up"] and rows[5]["step_s"] > 0


def test_a_range_the_run_never_reaches_is_said(make_cfg, tmp_path):
    said = []
    train(make_cfg(output_dir=str(tmp_path / "run"), max_steps=2, profile_steps="5"), log=said.append)
    assert any("did not reach step 5" in line for line in said) and not (tmp_path / "run" / "profile.txt").exists()


def test_a_steps_gpu_time_is_the_time_its_row_counts(make_cfg, tmp_path, monkeypatch):
    """Where the GPU's clock gives a step's time (CUDA), the row's step_s and the tok/s use it, not the gap between
    the host's reads (simulated here: every step after the first took 0.5 s on the GPU)."""
    from qvl.train import host

    monkeypatch.setattr(host, "seconds_between", lambda earlier, later: None if earlier is None else 0.5)
    train(make_cfg(output_dir=str(tmp_path / "run"), max_steps=4), log=lambda *_: None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step_s"] for r in rows[1:]] == [0.5, 0.5, 0.5]
    steady = [r for r in rows if not r["warm_up"]]
    tokens = sum(r["tokens"] - p["tokens"] for p, r in zip(rows, rows[1:]) if not r["warm_up"])
    assert steady and rows[-1]["tokens_per_s"] == pytest.approx(tokens / (0.5 * len(steady)))
