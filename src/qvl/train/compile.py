"""``torch.compile`` for training: which parts compile, whether a run compiles, and undoing it.

* :func:`compile_layers` — the decoder layers' parts or whole layers (regional compilation: one graph shared by
  every layer, dynamic sequence length, so varying row lengths do not recompile).
* :func:`compile_vision_blocks` / :func:`compile_vision_tower` — a frozen vision tower's blocks, or its whole forward.
* :func:`compile_choice` — ``compile_layers`` (``auto`` / true / false) resolved for a run, with why.
* :func:`uncompile` — all of the above undone (benchmarks reuse one model for several runs).
* :func:`compile_seconds` — the time compilation took so far (the first step's line splits its time with it);
  :func:`compiled_functions` — that time by function compiled (decoder layer, vision tower...);
  :func:`cache_counts` — how many of the graphs came from the compile cache.
* :class:`CompileFailures` — what could not compile and runs eagerly instead, one line each, not pages of traceback;
  :func:`say_failures` says them and keeps the tracebacks in the output folder.
* :func:`write_compile_times` — the output folder's compile_times.json.

Tested on CPU against the plain path (tests/train/test_speed.py); measured effects are in docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import re
import traceback
import types
from pathlib import Path

import torch

from qvl.errors import QvlError
from qvl.train.recompute import checkpoint_inside, decoder_layers


COMPILED_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
# without the attention module (per-sample attention reads sample bounds on the host mid-module): its norms
ATTENTION_NORMS = ("q_norm", "k_norm")
COMPILE_SCOPES = ("layer", "parts")
# (file, first line) of each function compiled here -> what it is, for the log's compile-time split
_WHAT: dict[tuple[str, int], str] = {}


def _named(fn, what: str) -> None:
    code = getattr(fn, "__code__", None)
    if code is not None:
        _WHAT[(code.co_filename, code.co_firstlineno)] = what


# torch 2.13 on draws a compiled CUDA dropout's mask four values at a time where the kernel is 1-D, with offsets that
# are only right for contiguous inputs: a dropout of a transposed, materialised tensor (the attention output that
# LoRA on o_proj reads) repeats its mask in groups of four, and a recompute in backward draws another mask: silently
# wrong gradients (pytorch/pytorch#198333, open). Eager random ops inside compiled code do not take that path.
RANDOM_FOUR_WIDE_SINCE = (2, 13)


def torch_release() -> tuple[int, int]:
    """(major, minor) of this torch; pre-releases count as their release ("2.13.0a0+git..." is (2, 13))."""
    major, minor = re.match(r"(\d+)\.(\d+)", str(torch.__version__)).groups()
    return int(major), int(minor)


def eager_random_ops(device, dropout: bool, recompute_inside: bool = False) -> str | None:
    """Set inductor's ``fallback_random`` (random ops run as eager kernels inside compiled code) where compiled
    dropout meets whole compiled layers that recompute inside (``recompute_inside``), or a CUDA torch with the
    four-wide path; returns the start-up line, None where nothing was set. For the whole process:
    :func:`qvl.train.loop.train` restores it when it returns."""
    import torch._inductor.config as inductor_config

    if not dropout:
        return None
    if recompute_inside:
        # inductor's own random ops (seeds offset per call) in a layer whose checkpointing it partitions: torch
        # 2.11's partitioner failed on them ("Node add_601 was invalid, but is output": lora_8b_24gb.yaml on an
        # H200 capped at 23.6 GiB, 2026-12-05; reproduced on a CPU with torch 2.11, 2026-12-06), and the loop compiled
        # each layer's parts instead: 0.92x transformers + peft on a 32 GB card (bench/results/train_cli_32gb.json),
        # the GPU idle 72 % of a step (train_cli_32gb_profile_h100.json). Eager dropout kernels partition, draw the masks
        # eager draws (tests/train/test_speed.py::test_whole_layer_compile_with_recompute_and_dropout_equals_eager)
        inductor_config.fallback_random = True
        return ("LoRA dropout in whole compiled layers that recompute runs torch's own dropout kernel (inductor "
                "fallback_random): inductor's own random ops there failed to compile on torch 2.11, and since 2.13 "
                "its CUDA dropout can repeat or change its mask (pytorch/pytorch#198333)")
    if getattr(device, "type", device) != "cuda" or torch_release() < RANDOM_FOUR_WIDE_SINCE:
        return None
    inductor_config.fallback_random = True
    return (f"LoRA dropout in compiled layers runs torch's own dropout kernel (inductor fallback_random): torch "
            f"{torch.__version__.split('+')[0]}'s compiled CUDA dropout can repeat or change its mask "
            "(pytorch/pytorch#198333); lora_dropout=0 avoids both")


def compile_layers(model, backend: str = "inductor", dynamic: bool = True, attention: bool = True,
                   eager_fallback: bool = False, scope: str = "parts") -> int:
    """``torch.compile`` the decoder layers in place. Returns the modules compiled.

    ``scope="layer"``: each whole decoder layer (norms, attention, LoRA adapters, MLP and the residual adds in one
    graph, forward and backward), with its gradient checkpointing moved inside the compiled code
    (:func:`checkpoint_inside`), the same on every transformers version: the compiler then plans the recompute.
    ``scope="parts"``: each layer's norms, attention and MLP apart, gradient checkpointing staying outside.
    The layers share their code, so one graph serves all of them; ``dynamic=True`` makes the sequence length
    symbolic, so rows of any length reuse it. ``attention=False`` (parts only) leaves the attention module eager
    and compiles its q/k norms instead.
    ``eager_fallback``: a part dynamo cannot trace, or whose forward graph the backend cannot build, runs eagerly
    (with a warning) instead of stopping the run (dynamo's ``suppress_errors``, set for the whole process:
    :func:`qvl.train.loop.train` restores it when it returns). The backward graph is built lazily in the first
    backward pass and is not covered.
    """
    if scope not in COMPILE_SCOPES:
        raise QvlError(f"compile scope {scope!r} is not one of {COMPILE_SCOPES}", where="compile_scope")
    import torch._dynamo

    if eager_fallback:
        torch._dynamo.config.suppress_errors = True
    # Python floats (LoRA's scaling, dropout's p, a norm's eps) traced as constants: traced as symbols, inductor's
    # pass that turns them into tensors gave up on them and dynamo traced each part a second time (the tiny model's
    # LoRA run on CPU, 2026-12-05: three of four functions restarted, 5.8 of 34 s of compiling in first attempts;
    # the compile_attempt_* rows of compile_times.json). For the whole process, like suppress_errors:
    # qvl.train.loop.train restores both when it returns
    torch._dynamo.config.specialize_float = True
    n = 0
    for layer in decoder_layers(model):
        if scope == "layer":
            checkpoint_inside(layer, getattr(layer, "qvl_recompute_context", None))
            parts = [layer]
        else:
            parts = [getattr(layer, name, None) for name in COMPILED_PARTS if attention or name != "self_attn"]
            if not attention:
                parts += [getattr(layer.self_attn, name, None) for name in ATTENTION_NORMS]
        for part in parts:
            if part is not None:
                _named(type(part).forward, "decoder layer" if part is layer else f"decoder {type(part).__name__}")
                part.compile(backend=backend, dynamic=dynamic)
                n += 1
    return n


def compile_vision_blocks(model, backend: str = "inductor") -> int:
    """``torch.compile`` each block of a frozen vision tower in place (dynamic patch counts); returns the blocks
    compiled, 0 when any vision weight trains (not measured: the tower then recomputes under checkpointing).

    The tower runs eagerly otherwise: ~27 blocks of small ops launched one by one from the host in every step, on a
    step that waits on the host (8B LoRA on an H100: +14 % tok/s with the blocks compiled, the same losses;
    docs/benchmarks.md). Undone by :func:`uncompile`."""
    blocks = [m for m in model.modules() if type(m).__name__.endswith("VisionBlock")]
    if not blocks or any(p.requires_grad for b in blocks for p in b.parameters()):
        return 0
    for block in blocks:
        _named(type(block).forward, "vision block")
        block.compile(backend=backend, dynamic=True)
    return len(blocks)


def compile_vision_tower(model, backend: str = "inductor", background: bool = False) -> bool:
    """Compile a frozen vision tower's whole forward as one graph (dynamic patch and segment counts), for callers
    that give it its ``grid_thw``-derived inputs precomputed (:mod:`qvl.train.row_forward`, which calls
    ``visual.qvl_compiled_forward``): one guard check and one launch sequence per call instead of one per block
    (27 for Qwen3-VL), on a step that waits on the host (8B LoRA on an H100: the tower's forward took ~60 ms of host
    time per call with its blocks compiled apart, for ~15 ms of kernels; docs/benchmarks.md). transformers'
    output-capturing decorator is left out (``__wrapped__``: dynamo cannot trace its ContextVar); what it adds
    (``output_hidden_states`` / ``output_attentions``) training does not ask for. The patch embedding runs as a matmul
    and the rotary cos / sin are stored once (:mod:`qvl.models.tower_speed`). The blocks are one nested compile
    region where torch has them: one block's graph compiled and called by all (the cold compile is most of a first
    step's wait). ``background``: the calls run the tower uncompiled until :func:`tower_in_background`'s ``start()``
    has compiled it in a thread (:mod:`qvl.train.background_compile`). False (nothing compiled) when any vision
    weight trains, or the forward is not a decorated one. Undone by :func:`uncompile`."""
    visual = next((m for m in model.modules() if type(m).__name__.endswith("VisionModel")), None)
    if visual is None or any(p.requires_grad for p in visual.parameters()):
        return False
    core = getattr(type(visual).forward, "__wrapped__", None)
    if core is None:
        return False
    from qvl.models import tower_speed

    tower_speed.linear_patch_embed(visual)
    tower_speed.stored_rotary(visual)
    for block in getattr(visual, "blocks", ()):
        # a frozen tower keeps nothing for backward, so checkpointing its blocks recomputes nothing; and under
        # transformers 5.17 (which checkpoints whatever the grad mode) dynamo failed tracing the checkpoint around
        # the block's region (KeyError on a size symbol)
        block.qvl_checkpointing, block.gradient_checkpointing = block.gradient_checkpointing, False
        if _BLOCK_REGION is not None:
            block.forward = types.MethodType(_block_in_region, block)
    _named(core, "vision tower")
    compiled = torch.compile(core, backend=backend, dynamic=True)

    def forward(*args, **kwargs):
        import torch._dynamo.config as dynamo_config
        import torch.fx.experimental._config as shape_config

        # no duck sizing: a micro-batch with as many media as some other input has entries (3 images, 3 grid
        # columns) would make the compiler assume those sizes equal and compile again (~40 s at 8B) when they are
        # not. Floats fixed: a dynamic float (a norm's eps) is read with .item() inside the block's region, which
        # inductor refuses (the tower then falls back to eager)
        with shape_config.patch(use_duck_shape=False), dynamo_config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    if background:
        from qvl.train.background_compile import CompileInBackground

        forward = CompileInBackground(forward, core, "the vision tower")
    visual.qvl_compiled_forward = forward
    return True


def tower_in_background(model):
    """The :class:`~qvl.train.background_compile.CompileInBackground` of a tower compiled with ``background``, or
    None."""
    from qvl.train.background_compile import CompileInBackground

    return next((f for m in model.modules() if isinstance(f := m.__dict__.get("qvl_compiled_forward"),
                                                           CompileInBackground)), None)


def _block_call(block, *args, **kwargs):
    return type(block).forward(block, *args, **kwargs)


# One traced and compiled graph for a block, called by every block of the tower (their parameters its inputs),
# instead of 27 copies of it in the tower's graph: the cold compile of the 8B tower on CPU took 20 s instead of 41 s
# on torch 2.14, 34 s instead of 49 s on torch 2.11 (bench/experiments/README.md). The block is the region's argument
# rather than the method's bound self: a region bound to each block as its method ran block 0's weights in every
# block (torch 2.14).
_BLOCK_REGION = (torch.compiler.nested_compile_region(_block_call)
                 if hasattr(torch.compiler, "nested_compile_region") else None)


def _block_in_region(self, hidden_states, *args, **kwargs):
    # the rotary cos / sin are inputs of their own: without duck sizing their length is a size symbol apart from the
    # patches' until block 0's body finds the two equal, so torch 2.11 traced block 0 with one input more than the
    # others, as a region of its own. Said equal first, every block is the same region (the 8B tower's cold compile
    # on CPU stayed 34-35 s: the second region was not what it cost; bench/experiments/README.md)
    if torch.compiler.is_compiling():
        for t in kwargs.get("position_embeddings") or ():
            torch._check(t.shape[0] == hidden_states.shape[0])
    return _BLOCK_REGION(self, hidden_states, *args, **kwargs)


def uncompile(model) -> None:
    """Undo :func:`compile_layers` (benchmarks reuse one model for several runs)."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
        tower = m.__dict__.pop("qvl_compiled_forward", None)
        if tower is not None:
            if hasattr(tower, "wait"):  # compiling in the background: let it end first
                tower.wait()
            from qvl.models import tower_speed

            tower_speed.restore(m)
        if getattr(m.__dict__.get("forward"), "__func__", None) is _block_in_region:
            del m.forward
        if "qvl_checkpointing" in m.__dict__:
            m.gradient_checkpointing = m.__dict__.pop("qvl_checkpointing")
        base = getattr(type(m), "qvl_base_class", None)
        if base is not None:
            m.__class__ = base
            m.gradient_checkpointing = m.__dict__.pop("qvl_recompute")
            m.__dict__.pop("qvl_recompute_context", None)


def compile_seconds() -> float:
    """Seconds ``torch.compile`` has spent in this process so far, by its own count (dynamo's tracing and the
    backend's compile of each graph; with dynamic shapes a backward graph compiles with its forward)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


def phase_seconds(minimum: float = 0.5) -> dict[str, float]:
    """Seconds ``torch.compile`` spent in each of its own timed phases in this process so far (dynamo's
    ``compilation_time_metrics``: bytecode tracing, AOTAutograd, inductor's forward and backward compiles, code
    generation, kernel builds, cache loads...), those of ``minimum`` s or more, longest first. The phases nest: a
    phase's seconds include its parts'. Where a cold first step's minutes go (:data:`COMPILE_TIMES`)."""
    from torch._dynamo.utils import compilation_time_metrics

    seconds = {name: round(sum(times), 2) for name, times in compilation_time_metrics.items()}
    return dict(sorted(((k, v) for k, v in seconds.items() if v >= minimum), key=lambda kv: -kv[1]))


COMPILE_TIMES = "compile_times.json"  # in the output folder: phase_seconds() after the first step and at the end


def compile_marker() -> set[int]:
    """What :func:`compiled_functions` counts from: the compilations so far."""
    from torch._dynamo.utils import get_compilation_metrics

    return {id(m) for m in get_compilation_metrics()}


def compiled_name(filename: str | None, first_line: int | None, name: str | None) -> str:
    """What a compiled function is: "decoder layer", "vision tower" for what this module compiled, else its name
    and file."""
    return _WHAT.get((filename, first_line)) or f"{name} ({Path(filename or '?').name})"


def compiled_functions(since: set[int] = frozenset()) -> list[tuple[str, float]]:
    """(what, seconds) for each function torch.compile compiled after ``since`` (:func:`compile_marker`), summed
    by function, longest first: "decoder layer", "vision tower" for what this module compiled, else the function's
    name and place. With dynamic shapes a backward graph compiles with its forward, so its time is in there."""
    from torch._dynamo.utils import get_compilation_metrics

    seconds: dict[str, float] = {}
    for m in get_compilation_metrics():  # the last 64 compilations (dynamo keeps no more)
        if id(m) in since or not m.entire_frame_compile_time_s:
            continue
        what = compiled_name(m.co_filename, m.co_firstlineno, m.co_name)
        seconds[what] = seconds.get(what, 0.0) + m.entire_frame_compile_time_s
    return sorted(seconds.items(), key=lambda kv: -kv[1])


def cache_counts() -> tuple[int, int]:
    """(graphs inductor took from its compile cache, graphs it compiled or took) in this process so far."""
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    hits = c["fxgraph_cache_hit"]
    return hits, hits + c["fxgraph_cache_miss"] + c["fxgraph_cache_bypass"]


def compile_wanted(choice, device: torch.device) -> bool:
    """``compile_layers`` config value -> on/off: ``auto`` is on for CUDA, off on CPU (slow to build there)."""
    if choice == "auto":
        return device.type == "cuda"
    return bool(choice)


def compile_choice(choice, device: torch.device, engine: str, per_sample: bool, moe: bool,
                   varlen: bool = True, quantized: bool = False) -> tuple[bool, str]:
    """(compile?, why) for the loop. ``auto`` compiles where it was measured faster with equal losses: a GPU, one
    process or DDP, a dense model, packed rows with per_sample attention on the flash varlen kernel (``varlen``:
    torch >= 2.10 and bf16; without it the compiled attention would build an L x L mask per layer) (8B LoRA on an
    H100: +10 % and +45 % in two calls, 2-3 GiB less memory; docs/benchmarks.md); not quantised layers (``quantized``).
    ``true`` compiles any single-GPU / DDP run. ``why`` is empty when there is nothing worth saying (off by choice, or auto on CPU)."""
    if not compile_wanted(choice, device):
        return False, ""
    if engine != "ddp":  # sharding wrappers around compiled regions are not measured or tested: keep them apart
        return False, f"not under {engine} (tested with one GPU and DDP only)"
    if choice != "auto":
        return True, "on"
    if quantized:
        return False, ("auto: 4/8-bit layers run eagerly: compiled, 8B NF4 LoRA on an H200 ran ~30 % faster but its "
                       "first step took 94 s instead of 4 s on a cold compile cache (2026-12-05, "
                       "bench/results/train_qlora.json): compile_layers=true pays off from a few hundred steps, and "
                       "is not measured on a 24 GB card yet")
    if moe:
        return False, ("auto: mixture-of-experts layers are not measured compiled yet (their grouped experts trace "
                       "as one graph, tests/models/test_moe_experts.py; compile_layers=true forces it)")
    if not per_sample:
        return False, ("auto: measured only on packed rows with per_sample attention (data_flatten=true); "
                       "compile_layers=true forces it")
    if not varlen:
        return False, ("auto: per_sample attention runs without the flash varlen kernel here (it needs torch >= 2.10 "
                       "and bf16): compiled, it would build an L x L mask per layer")
    return True, "auto"


DYNAMO_LOG = "torch._dynamo.convert_frame"  # where dynamo warns "WON'T CONVERT" when it suppresses an error


class CompileFailures(logging.Filter):
    """The functions dynamo could not compile under ``suppress_errors`` (``compile_layers: auto``): each then runs
    eagerly, and dynamo warns with pages of traceback in the middle of the progress lines. Attached to dynamo's
    logger (:meth:`attach`), this keeps them instead: :meth:`take` hands each new one over once, as
    (function, reason, full text), for the loop to say in one line and write out whole."""

    def __init__(self):
        super().__init__()
        self.failures: list[tuple[str, str, str]] = []
        self.taken = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("WON'T CONVERT"):
            return True
        words = message.splitlines()[0].split()  # WON'T CONVERT <name> <file> [line <n>]
        where = Path(words[3]).name + (f":{words[-1]}" if words[-2:-1] == ["line"] else "") if len(words) > 3 else ""
        name = f"{words[2]} ({where})" if len(words) > 2 else "a function"
        error = record.exc_info[1] if record.exc_info else None
        inner = getattr(error, "inner_exception", None) or error  # the backend's own error, not dynamo's wrapper
        reason = (f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0]}" if inner is not None
                  else message.strip().splitlines()[-1])
        if any((name, reason) == (n, r) for n, r, _ in self.failures):
            return False  # the same function failing the same way again (dynamo may retry a frame): said once
        text = message + ("\n" + "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else "")
        self.failures.append((name, reason, text))
        return False

    def attach(self) -> "CompileFailures":
        logging.getLogger(DYNAMO_LOG).addFilter(self)
        return self

    def detach(self) -> None:
        logging.getLogger(DYNAMO_LOG).removeFilter(self)

    def take(self) -> list[tuple[str, str, str]]:
        new = self.failures[self.taken:]
        self.taken = len(self.failures)
        return new


COMPILE_ERRORS = "compile_errors.log"


def write_compile_times(out: Path, when: str) -> None:
    """The output folder's compile_times.json: torch.compile's time by phase in this process so far (nothing when
    nothing compiled). Rewritten at the end: the vision tower's background compile and later shapes add to it."""
    phases = phase_seconds()
    if not phases:
        return
    from qvl.utils.fs import atomic_write_json

    atomic_write_json(out / COMPILE_TIMES,
                      {"when": when, "functions": dict(compiled_functions()), "phases_s": phases,
                       "note": "torch.compile's own phase timers, this process so far; phases nest (a phase's "
                               "seconds include its parts')"})


def say_failures(failures: list[tuple[str, str, str]], out: Path, say) -> None:
    """One line for each function torch.compile gave up on (``failures``: :meth:`CompileFailures.take`'s (name,
    reason, full text)): it runs eagerly, the run goes on, slower. The full errors go to ``out``'s
    compile_errors.log."""
    if not failures:
        return
    path = out / COMPILE_ERRORS
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(text.rstrip() + "\n\n" for _, _, text in failures)
    for name, reason, _ in failures:
        say(f"compile_layers: torch.compile could not build {name}: {reason}. It runs eagerly (slower than "
            f"compiled; the run goes on); the full error is in {path}. compile_layers=false skips trying")
