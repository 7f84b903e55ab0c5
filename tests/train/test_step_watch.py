"""A long step says what it does while it runs (qvl.train.step_watch): what the threads' stacks show, the line,
the thread's timing, and the training loop's use of it."""

from __future__ import annotations

import functools
import time

from qvl.train import step_watch
from qvl.train.step_watch import StepWatch, doing

LOOP = [("/x/qvl/train/loop.py", "_run_steps", None), ("/x/qvl/train/graphs.py", "decoder_stack", None)]
DYNAMO = [("/x/torch/_dynamo/convert_frame.py", "__call__", None),
          ("/x/torch/_dynamo/convert_frame.py", "_compile", "decoder layer")]
INDUCTOR = [("/x/torch/_inductor/compile_fx.py", "compile_fx_inner", None)]


def test_what_the_stacks_show():
    assert doing([LOOP + DYNAMO + INDUCTOR]) == "compiling decoder layer"  # the function dynamo converts
    # a backward graph compiles lazily, on the autograd thread where the device has one
    assert doing([LOOP, [("/x/torch/autograd/graph.py", "backward", None)] + INDUCTOR]) == "compiling a backward graph"
    recording = LOOP[:1] + [("/x/qvl/train/graphs.py", "_record", None)] + LOOP[1:]
    assert doing([recording]) == "recording a CUDA graph"
    assert doing([recording + DYNAMO]) == "compiling decoder layer"  # a recording's warm-up run compiles
    # running compiled code is not compiling (its wrapper's frames are eval_frame's, not convert_frame's _compile)
    assert doing([LOOP + [("/x/torch/_dynamo/eval_frame.py", "_fn", None)]]) == ""


def test_a_real_compile_is_named(tmp_path, monkeypatch):
    """With torch.compile itself (CPU inductor): the line names the function being compiled."""
    import torch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    said = []
    watch = StepWatch(said.append, after=0.3, every=0.3)

    def mixer(x):
        for _ in range(12):
            x = torch.nn.functional.gelu(x @ x.T) + x.sin()
        return x

    try:
        watch.begin(1)
        torch.compile(mixer)(torch.randn(16, 16))
        watch.end()
    finally:
        watch.close()
    assert said and all(line.startswith("step 1: ") for line in said)
    assert any("compiling mixer (test_step_watch.py)" in line for line in said), said


def test_the_line():
    assert StepWatch.line(1, 41.6, "compiling vision tower", [("decoder layer", 12.2)]) == (
        "step 1: 42 s so far, compiling vision tower (done: decoder layer 12 s)")
    assert StepWatch.line(7, 25, "", []) == "step 7: 25 s so far, still running"


def _frame_in(path: str, name: str, body):
    """A function whose frame shows as ``name`` in ``path`` on the stack, running ``body()``."""
    scope = {"body": body}
    exec(compile(f"def {name}(code=None):\n    return body()\n", path, "exec"), scope)
    return scope[name]


def test_a_long_step_says_what_it_does_while_it_runs_and_stops_when_done():
    said = []
    watch = StepWatch(said.append, after=0.2, every=0.3, since=lambda: None,
                      compiled=lambda marker: [("decoder layer", 12.0)])
    try:
        watch.begin(1)
        _frame_in("/x/torch/_dynamo/convert_frame.py", "_compile", lambda: time.sleep(0.9))(code=time.sleep.__call__)
        watch.end()
        n = len(said)
        watch.begin(2)  # a short step says nothing
        time.sleep(0.1)
        watch.end()
        time.sleep(0.5)
    finally:
        watch.close()
    assert 2 <= n <= 3 and len(said) == n, said
    assert said[0].startswith("step 1: ") and said[0].endswith("s so far, compiling (done: decoder layer 12 s)"), said


def test_the_training_loop_says_what_a_long_step_does(make_cfg, tmp_path, monkeypatch):
    """Wired into the loop: a step held up (here by a slow micro-step) is reported while it runs, through the
    tracker's writer, with its number."""
    from qvl.train import distributed, loop

    monkeypatch.setattr(loop, "StepWatch", functools.partial(step_watch.StepWatch, after=0.2, every=10))
    real = distributed.micro_step

    def slow(*args, **kwargs):
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed, "micro_step", slow)
    lines = []
    loop.train(make_cfg(output_dir=str(tmp_path / "run"), max_steps=2, save_strategy="no",
                        gradient_accumulation_steps=1), log=lines.append)
    watched = [line for line in lines if " s so far, " in line]
    assert [line.split(":")[0] for line in watched] == ["step 1", "step 2"], lines
