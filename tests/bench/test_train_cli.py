"""bench/train_cli.py: what a CLI row reports from a run's output lines and metrics.jsonl, and the commands it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from train_cli import measure, qvl_train_command, recipe_command, run_command  # noqa: E402


def test_steady_rate_leaves_warm_up_steps_out_and_first_step_comes_from_the_log():
    t0 = 1000.0
    lines = [(12.0, "memory preflight: fits"), (70.5, "first step done 70 s after start (model load 9 s)"),
             (71.0, "step 1/5 | loss 4.0 | ...")]
    rows = [{"step": 1, "tokens": 1000, "time": t0 + 71.0, "warm_up": "compiled 5 graphs", "loss": 4.0,
             "peak_mem_gib": 30.0, "peak_reserved_gib": 40.0},
            {"step": 2, "tokens": 2000, "time": t0 + 72.0, "warm_up": None, "loss": 3.9, "peak_mem_gib": 31.0},
            {"step": 3, "tokens": 3000, "time": t0 + 75.0, "warm_up": "recorded 1 row shape", "loss": 3.8},
            {"step": 4, "tokens": 5000, "time": t0 + 76.0, "warm_up": None, "loss": 3.7},
            {"step": 5, "tokens": 6000, "time": t0 + 76.5, "warm_up": None, "loss": 3.6}]
    res = measure(lines, rows, t0)
    assert res["time_to_first_step_s"] == 70.5
    assert res["steady_steps"] == 3 and res["warm_up_steps"] == 2
    assert res["tokens_per_s"] == pytest.approx((1000 + 2000 + 1000) / (1.0 + 1.0 + 0.5))
    assert res["whole_run_tokens_per_s"] == pytest.approx(6000 / 76.5)
    assert res["peak_gib"] == 31.0 and res["peak_reserved_gib"] == 40.0
    assert res["final_loss_mean5"] == pytest.approx(3.8)
    assert res["start_up"] == ["memory preflight: fits", "first step done 70 s after start (model load 9 s)"]
    assert res["warm_up_notes"] == ["step 1: compiled 5 graphs", "step 3: recorded 1 row shape"]


def test_steady_rate_takes_the_gpu_step_time_where_a_row_has_it():
    """A row's ``step_s`` (the GPU's time between step ends) beats the gap between rows: a video run's only steady
    step was written 0.65 s after the one before it, while the GPU ran it for seconds."""
    rows = [{"step": 1, "tokens": 1000, "time": 10.0, "warm_up": "compiled", "loss": 4.0, "step_s": None},
            {"step": 2, "tokens": 81000, "time": 10.65, "warm_up": None, "loss": 3.9, "step_s": 8.0}]
    res = measure([], rows, 0.0)
    assert res["tokens_per_s"] == pytest.approx(80000 / 8.0) and res["step_s"] == 8.0


def test_a_run_that_wrote_nothing_measures_as_empty():
    res = measure([(3.0, "error: memory preflight: does not fit")], [], 0.0)
    assert res["tokens_per_s"] == 0.0 and res["time_to_first_step_s"] is None and res["steps"] == 0


def test_commands_change_only_paths_and_steps(tmp_path):
    cmd = qvl_train_command("lora_8b_24gb", tmp_path / "m", tmp_path / "r.yaml", tmp_path / "o", 30)
    assert cmd[3:5] == ["train", str(Path(__file__).resolve().parents[2] / "examples" / "lora_8b_24gb.yaml")]
    assert sorted(a.split("=")[0] for a in cmd[5:]) == ["dataset_registry", "dataset_use", "max_steps",
                                                       "model_name_or_path", "output_dir", "resume"]
    recipe = recipe_command(tmp_path / "m", tmp_path / "r.yaml", tmp_path / "o", 30)
    assert recipe[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m"]
    assert "--deepspeed" in recipe and recipe[recipe.index("--per_device_train_batch_size") + 1] == "2"


def test_a_stopped_bench_keeps_the_steps_its_row_ran(tmp_path):
    """`timeout` (SIGTERM) during a CLI row: the row still reports the steps written so far, marked stopped, and the
    training process goes (a 30-step row cut at step 27 used to lose every number)."""
    import os
    import signal
    import threading
    import time

    rows = [{"step": s, "tokens": 1000 * s, "time": 0.0, "warm_up": None if s > 1 else "compiled", "loss": 4.0,
             "step_s": 0.5, "peak_mem_gib": 1.0} for s in (1, 2, 3)]
    script = ("import json, sys, time\n"
              f"open({str(tmp_path / 'metrics.jsonl')!r}, 'w').write(''.join(json.dumps(r) + '\\n' for r in {rows!r}))\n"
              "print('first step done 1 s after start', flush=True)\n"
              "time.sleep(60)\n")
    done = threading.Event()

    def stop_once_written():  # as `timeout` would, once the row has steps to report
        while not done.is_set():
            if (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "metrics.jsonl").read_text().count("\n") == 3:
                time.sleep(0.2)  # the line after it reaches the bench too
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stopper = threading.Thread(target=stop_once_written, daemon=True)
    stopper.start()
    try:
        res = run_command("row", [sys.executable, "-c", script], tmp_path, timeout=30)
    finally:
        done.set()
        signal.signal(signal.SIGTERM, previous)
    assert res["stopped"] and res["steps"] == 3 and "stopped from outside after 3 steps" in res["error"]
    assert res["tokens_per_s"] == pytest.approx(2000 / 1.0) and res["rc"] is None


def test_the_saved_model_goes_where_it_fits(monkeypatch):
    """The CLI rows load a saved copy of the model: in the temp folder when its disk has room, else in /dev/shm
    (30B-A3B's 58 GiB against a 64 GiB disk), else the temp folder all the same (saving then fails there, said)."""
    import collections
    import shutil

    import train_throughput

    gib = 2**30
    free = {}
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, free["shm" if path == "/dev/shm" else "tmp"]))
    monkeypatch.setattr(train_throughput.os.path, "isdir", lambda path: True)
    free.update(tmp=47 * gib, shm=128 * gib)
    assert train_throughput.work_root(16 * gib) is None  # 8B: the temp folder
    assert train_throughput.work_root(58 * gib) == "/dev/shm"
    free.update(tmp=60 * gib)  # room for the model but not for a run beside it (its 29 GiB checkpoint)
    assert train_throughput.work_root(58 * gib) == "/dev/shm"
    free.update(shm=30 * gib)
    assert train_throughput.work_root(58 * gib) is None


def test_the_runs_go_to_the_disk_when_the_model_went_to_memory(monkeypatch, tmp_path):
    """With the saved model in /dev/shm, the CLI rows' runs (checkpoints, the trained model) go to the temp
    folder's disk when it has room for one, else beside the model."""
    import collections
    import shutil
    import tempfile

    import train_throughput

    gib = 2**30
    free = {}
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, free["tmp"]))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    shm = Path("/dev/shm/qvl_bench_x")
    free.update(tmp=60 * gib)
    runs = train_throughput.runs_folder(shm, 58 * gib)
    assert runs.parent == tmp_path and runs.name.startswith("qvl_bench_runs_")
    free.update(tmp=20 * gib)
    assert train_throughput.runs_folder(shm, 58 * gib) == shm
    assert train_throughput.runs_folder(tmp_path / "w", 58 * gib) == tmp_path / "w"  # on the disk already


def test_a_cli_row_compares_with_the_baseline_of_its_own_settings():
    """cli:lora_30b_a3b+lora_r=16 against baseline-moe+lora_r=16 where that ran, else baseline-moe; a speed lever
    (+gradient_checkpointing_ratio=1.0) keeps the YAML's own baseline; a YAML with no baseline of its own is timed
    against `baseline` and its losses compared only with baseline-yaml."""
    import train_throughput

    ran = {"tokens_per_s": 1.0}
    results = {"baseline": ran, "baseline-moe": ran, "baseline-moe+lora_r=16": ran}
    ref = train_throughput.reference_rows
    assert ref("lora_30b_a3b", ["lora_r=16"], results) == ("baseline-moe+lora_r=16", "baseline-moe+lora_r=16")
    assert ref("lora_30b_a3b", ["gradient_checkpointing_ratio=1.0"], results) == ("baseline-moe", "baseline-moe")
    both = ("baseline-moe+lora_r=16", "baseline-moe+lora_r=16")  # the baseline of the most of the row's settings
    assert ref("lora_30b_a3b", ["lora_r=16", "packed_row_tokens=null"], results) == both
    assert ref("lora_30b_a3b", ["packed_row_tokens=null", "lora_r=16"], results) == both
    only_r16 = {k: v for k, v in results.items() if k != "baseline-moe"}
    assert ref("lora_30b_a3b", ["lora_r=16", "packed_row_tokens=null"], only_r16) == both
    assert ref("lora_30b_a3b", [], only_r16) == ("baseline", None)  # r=16's baseline is not the r=64 row's
    assert ref("lora_30b_a3b", [], {"baseline": ran, "baseline-moe": {"error": "OOM"}}) == ("baseline", None)
    assert ref("lora_8b_24gb", [], {"baseline": ran, "baseline-yaml": ran}) == ("baseline", "baseline-yaml")
    assert ref("full_4b", [], results) == ("baseline-full", "baseline-full")


def test_losses_compare_over_the_steps_both_rows_trained():
    """A CLI row stopped after 3 steps against a baseline of 6: its last steps against the baseline's same steps."""
    import train_throughput

    ratio = train_throughput.last5_loss_ratio
    assert ratio([4.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0, 1.0, 1.0]) == 0.0
    assert ratio([2.2, 2.2, 2.2, 2.2, 2.2, 1.1], [2.0, 2.0, 2.0, 2.0, 2.0, 1.0]) == pytest.approx(0.1)
    assert ratio([], [1.0]) is None and ratio([1.0], None) is None


def test_the_rate_after_step_one_counts_warm_up_steps_too():
    """Eager MoE rows meet a new matmul shape for many steps: the steady rate then has few steps, so the row also
    reports every step after the first."""
    rows = [{"step": 1, "tokens": 1000, "time": 10.0, "warm_up": "met 3 new matmul shapes", "loss": 4.0},
            {"step": 2, "tokens": 3000, "time": 11.0, "warm_up": "met 1 new matmul shape", "loss": 3.9, "step_s": 1.0},
            {"step": 3, "tokens": 4000, "time": 12.0, "warm_up": None, "loss": 3.8, "step_s": 0.5},
            {"step": 4, "tokens": 5000, "time": 19.0, "warm_up": "profiled", "loss": 3.7, "step_s": 7.0}]
    res = measure([], rows, 0.0)
    assert res["tokens_per_s"] == pytest.approx(1000 / 0.5)
    assert res["after_first_tokens_per_s"] == pytest.approx(3000 / 1.5)  # the profiled step's time is the profiler's
    assert measure([], rows[:1], 0.0)["after_first_tokens_per_s"] == 0.0


def test_gpu_mem_baseline_caps_a_cli_row_at_its_baseline_peak():
    import train_throughput

    """The cap is the card the baseline held: its allocator's reserved peak plus the CUDA context, as ``gpu_mem``
    counts a card (its allocated peak, 70.2 GiB, was refused a run that then peaked at 69.9 allocated)."""
    results = {"baseline": {"tokens_per_s": 1.0, "peak_gib": 20.0, "peak_reserved_gib": 22.0},
               "baseline-moe+lora_r=16": {"tokens_per_s": 1.0, "peak_gib": 70.1834, "peak_reserved_gib": 73.51}}
    cap = train_throughput.capped_at_baseline
    sets = ["lora_r=16", "gpu_mem=baseline"]
    assert [cap(s, "lora_30b_a3b", sets, results) for s in sets] == ["lora_r=16", "gpu_mem=74.1GiB"]
    with pytest.raises(ValueError, match="did not run in this call"):
        cap("gpu_mem=baseline", "lora_30b_a3b", ["gpu_mem=baseline"], {"baseline-moe": {"error": "OOM"}})


def test_a_shorter_baseline_keeps_the_cli_rows_schedule(tmp_path):
    """--baseline-steps: the baseline stops early on the CLI rows' learning-rate schedule, so the losses of the
    steps both trained compare (an 8-step schedule against a 30-step one made -5.3 % of schedule alone). The
    bench itself, on the tiny MoE on the CPU: 4 of 8 steps are the 8-step run's first 4 (a 4-step schedule's learning
    rate differs from step 2 on)."""
    import json
    import subprocess

    bench = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"

    def losses(*extra):
        out = tmp_path / f"run{len(extra)}.json"
        subprocess.run([sys.executable, str(bench), "--model", "tiny-moe", "--device", "cpu", "--samples", "32",
                        "--cli-steps", "8", "--only", "baseline-moe", "--out", str(out), *extra], check=True,
                       capture_output=True, timeout=300)
        return json.loads(out.read_text())["contestants"]["baseline-moe"]["losses"]

    full, short = losses(), losses("--baseline-steps", "4")
    assert len(full) == 8 and short == full[:4]
