"""The progress line's rate and ETA leave warm-up steps out; what the tracker writes per step."""

from __future__ import annotations

import json

import pytest

from qvl.train.track import Throughput, Tracker


def test_rate_and_eta_count_only_steps_after_warm_up():
    t = Throughput(total_steps=40, start_step=0, now=0.0)
    t.add(1, tokens=1000, now=60.0, warm=True)  # compiled and recorded: a minute
    assert t.rate is None and t.eta(1) is None  # unknown, not "17 tok/s, ETA 40 min"
    t.add(2, tokens=2000, now=61.0, warm=False)
    assert t.rate == pytest.approx(2000.0)
    assert t.eta(2) == pytest.approx(38 * 1.0)
    t.add(3, tokens=1000, now=66.0, warm=True)  # a new row shape recorded: left out again
    t.add(4, tokens=3000, now=67.5, warm=False)
    assert t.rate == pytest.approx(5000 / 2.5)
    assert t.eta(4) == pytest.approx(36 * 1.25)
    assert t.tokens == 7000  # every step's tokens are still counted
    assert t.eta(40) == 0


def test_a_step_time_given_by_the_loop_replaces_the_gap_between_reports():
    """The loop reads step N after queueing N+1: with the host the slow side, the gap between two reports is the
    next step's queueing. The GPU's step time (host.seconds_between) is what counts when the loop has it."""
    t = Throughput(total_steps=10, start_step=0, now=0.0)
    assert t.add(1, tokens=1000, now=60.0, warm=True) == 60.0  # the first step: since the tracker started
    assert t.add(2, tokens=8000, now=60.5, warm=False, seconds=4.0) == 4.0  # reported 0.5 s later, ran 4 s
    assert t.rate == pytest.approx(2000.0) and t.eta(2) == pytest.approx(8 * 4.0)
    t.add(3, tokens=8000, now=64.0, warm=False)  # no GPU time (CPU): the gap since the last report
    assert t.rate == pytest.approx(16000 / 7.5)


def test_rate_after_resume_and_logging_gaps():
    t = Throughput(total_steps=100, start_step=50, now=10.0)
    t.add(51, tokens=500, now=20.0, warm=True)
    t.add(60, tokens=9000, now=29.0, warm=False)  # nine steps since the last report
    assert t.rate == pytest.approx(1000.0)
    assert t.eta(60) == pytest.approx(40 * 1.0)


def test_tracker_lines_say_warming_up_until_a_steady_step(tmp_path):
    from types import SimpleNamespace

    cfg = SimpleNamespace(report_to=["none"], run_name=None)
    said = []
    tracker = Tracker(tmp_path, cfg, total_steps=10, log=said.append)
    metrics = {"loss": 1.0, "lr": 1e-4}
    tracker.step(1, metrics, 100, log_now=False)  # the first step is a warm-up step: printed all the same
    tracker.step(2, metrics, 100, log_now=False, warm="recorded 1 row shape")
    tracker.step(3, metrics, 100, log_now=True)
    assert len(said) == 3
    assert "warming up (the first step)" in said[0] and "ETA -" in said[0]
    assert "warming up (recorded 1 row shape)" in said[1]
    assert "tok/s" in said[2] and "ETA -" not in said[2]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["warm_up"] for r in rows] == ["the first step", "recorded 1 row shape", None]
    assert [r["tokens"] for r in rows] == [100, 200, 300]
    assert rows[0]["tokens_per_s"] is None and rows[2]["tokens_per_s"] > 0
    assert all(r["time"] > 0 for r in rows)


def test_the_first_step_line_says_where_the_wait_went():
    from qvl.train.track import first_step_line

    line = first_step_line(224.4, 28.2, 0.0, 196.0, 131.0, 24.6)
    assert line == ("first step done 224 s after start (model load 28 s; first step 196 s: compiling 131 s, "
                    "recording CUDA graphs 25 s, the rest 40 s)")
    # nothing compiled or recorded (a CPU run): the step's time alone; shapes met ahead said when they took time
    assert first_step_line(5.0, 2.0, 0.2, 3.0, 0.0, 0.0) == "first step done 5 s after start (model load 2 s; first step 3 s)"
    assert "shapes met ahead 40 s" in first_step_line(90, 20, 40, 30, 10, 0)
    # whether the compiled code came from the compile cache: a cold cache is why a first run waits longest
    cold = first_step_line(150, 10, 0, 135, 128, 2, cached=(0, 6))
    assert "compiling 128 s (none in the compile cache yet: the next run of this config reuses them)" in cold
    assert "compiling 6 s (6 of 6 graphs from the compile cache)" in first_step_line(20, 10, 0, 8, 6, 0, cached=(6, 6))
    # and which functions the compile time went to (under a second: not worth a word)
    split = first_step_line(150, 10, 0, 135, 128, 2, cached=(0, 2),
                            functions=[("decoder layer", 90.4), ("vision tower", 37.2), ("loss", 0.4)])
    assert "compiling 128 s (decoder layer 90 s, vision tower 37 s; none in the compile cache yet" in split
    assert "compiling 128 s (decoder layer 90 s)," in first_step_line(150, 10, 0, 135, 128, 2,
                                                                     functions=[("decoder layer", 90.4)])


def test_steps_that_ran_the_tower_uncompiled_while_it_compiled_in_the_background_are_warm_up():
    """WarmUpEvents: a step while the vision tower compiles in a thread is warm-up (it runs the tower uncompiled and
    shares the GIL with the compile: slower, and left out of tok/s and ETA); the step in which the compile ended says
    so; later steps are steady."""
    import threading

    import torch

    from qvl.train.background_compile import CompileInBackground
    from qvl.train.track import WarmUpEvents

    go_on = threading.Event()

    def backend(gm, inputs):
        assert go_on.wait(60)
        return gm.forward

    def double(x):
        return x * 2

    tower = CompileInBackground(torch.compile(double, backend=backend), double, "the vision tower")
    events = WarmUpEvents(background=tower)
    tower(torch.ones(3))  # the first step: before the compile starts, the first step is warm-up anyway
    assert events.since_last() == ""
    assert tower.start()
    assert events.since_last() == "the vision tower compiling in the background"  # with or without a tower call
    tower(torch.ones(3))
    assert events.since_last() == "the vision tower compiling in the background"
    go_on.set()
    assert tower.wait(60)
    tower(torch.ones(3))
    assert events.since_last().startswith("compiled 1 graph, the vision tower compiled in the background in ")
    tower(torch.ones(3))
    assert events.since_last() == ""
