"""Run tracking: metrics.jsonl (always), TensorBoard (default), W&B (when asked), loss.png, a progress line, and
what the warm-up did (:class:`WarmUpEvents`, :func:`first_step_line`).

``metrics.jsonl`` is the source of truth: one JSON row per logged step. On resume the rows after
the checkpoint's step are dropped, so the file (and loss.png) always shows one consistent curve.
``loss.png`` uses matplotlib when installed and draws a plain chart with Pillow otherwise.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_gib(device) -> float:
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB (process RSS)


def peak_reserved_gib(device) -> float | None:
    """What torch's allocator held at most (what a memory cap limits), None off the GPU."""
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_reserved(device) / 2**30
    return None


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Throughput:
    """tok/s and ETA from the steps done after warm-up.

    A warm-up step is the first one, or one that compiled code or recorded a CUDA graph (the loop says which): it can
    take seconds more than the steps after it, so counting it would make the first lines' rate far too low and their
    ETA far too long (an 8B run read "250 tok/s | ETA 0:21:28" while warming up, 30 s before it ended). Rate and ETA
    therefore come from the other steps; until one has finished, both are unknown (None) and the line says "warming
    up".
    A step's time is what the loop measured (the time between two step ends: on CUDA by the GPU's clock), else (the
    first step) the wall time since the tracker started; the row's ``step_s`` is the time used."""

    def __init__(self, total_steps: int, start_step: int, now: float):
        self.total, self.last_step, self.last_time = total_steps, start_step, now
        self.tokens = 0  # every step's, warm-up included
        self.steady_tokens, self.steady_seconds, self.steady_steps = 0, 0.0, 0
        self.warm_steps, self.warm_seconds = 0, 0.0

    def add(self, step: int, tokens: int, now: float, warm: bool, seconds: float | None = None) -> float:
        """Count one step; returns the seconds it was given."""
        if seconds is None:
            seconds = now - self.last_time
        steps = max(1, step - self.last_step)
        self.last_step, self.last_time = step, now
        self.tokens += tokens
        if warm:
            self.warm_steps += steps
            self.warm_seconds += seconds
        else:
            self.steady_tokens += tokens
            self.steady_seconds += seconds
            self.steady_steps += steps
        return seconds

    @property
    def rate(self) -> float | None:
        """Tokens per second over the steps after warm-up (None before the first)."""
        return self.steady_tokens / self.steady_seconds if self.steady_steps and self.steady_seconds > 0 else None

    def eta(self, step: int) -> float | None:
        """Seconds left at ``step``: the remaining steps at the mean time of a step after warm-up."""
        if not self.steady_steps:
            return None
        return self.steady_seconds / self.steady_steps * max(0, self.total - step)


class Tracker:
    def __init__(self, run_dir: Path, cfg, total_steps: int, start_step: int = 0, rank: int = 0, log=print,
                 device="cpu"):
        self.run_dir, self.cfg, self.total, self.rank, self.log_fn = Path(run_dir), cfg, total_steps, rank, log
        self.device = device
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.throughput = Throughput(total_steps, start_step, self.t0)
        self.notes: list[str] = []
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = self.wandb = self.bar = None
        if rank != 0:
            return
        self._truncate_metrics(start_step)
        targets = set(cfg.report_to) - {"none"}
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self.notes.append("TensorBoard logging is off: `pip install tensorboard` to turn it on")
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                from qvl.errors import QvlError

                raise QvlError("report_to includes wandb but wandb is not installed", where="report_to",
                               fix="pip install wandb, or report_to=tensorboard") from None
            self.wandb = wandb.init(project="qvl", name=cfg.run_name, config=cfg.model_dump(mode="json"),
                                    dir=str(self.run_dir), resume="allow")
        if sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                # tqdm's own rate and ETA would count the warm-up steps: the postfix carries Throughput's
                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                                file=sys.stderr, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            except ImportError:
                pass
        for n in self.notes:
            self.log_fn(f"note: {n}")

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue
        from qvl.utils.fs import atomic_write_text

        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    def step(self, step: int, metrics: dict, tokens: int, log_now: bool, warm: str = "",
             seconds: float | None = None) -> dict:
        """Record one optimizer step; returns the row with throughput and ETA filled in. ``warm``: what this step
        warmed up (compiled, recorded), empty for a steady step; ``seconds``: the step's time where the loop measured
        it (:class:`Throughput`)."""
        now = time.perf_counter()
        if step == self.start_step + 1 and not warm:  # the loader's workers start, the allocator grows
            warm = "the first step"
        seconds = self.throughput.add(step, tokens, now, bool(warm), seconds)
        rate, eta = self.throughput.rate, self.throughput.eta(step)
        elapsed = now - self.t0
        row = {"step": step, **metrics, "tokens": self.throughput.tokens, "tokens_per_s": rate,
               "peak_mem_gib": peak_memory_gib(self.device), "peak_reserved_gib": peak_reserved_gib(self.device),
               "elapsed_s": elapsed, "eta_s": eta, "step_s": seconds,
               "warm_up": warm or None, "time": time.time()}
        if self.rank != 0:
            return row
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step" and v is not None}, step=step)
        speed = (f"warming up ({warm})" if warm and rate is None else
                 "warming up" if rate is None else f"{rate:,.0f} tok/s" + (f" (this step: {warm})" if warm else ""))
        line = (f"step {step}/{self.total} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | {speed} | "
                f"peak {row['peak_mem_gib']:.2f} GiB | ETA {'-' if eta is None else _fmt_time(eta)}")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {row['loss']:.4f} lr {row['lr']:.1e} "
                                     f"{'warming up' if rate is None else f'{rate:,.0f} tok/s'} "
                                     f"peak {row['peak_mem_gib']:.1f} GiB ETA {'-' if eta is None else _fmt_time(eta)}",
                                     refresh=False)
            if log_now or warm:
                self.bar.write(line, file=sys.stderr)
        elif log_now or warm:
            self.log_fn(line)
        return row

    def write(self, line: str) -> None:
        """A line above the progress bar (or to the log without one); rank 0 only."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            self.log_fn(line)

    def close(self) -> Path | None:
        if self.rank != 0:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return plot_metrics(self.metrics_path, self.run_dir / "loss.png")


class WarmUpEvents:
    """What compiled, was recorded or met a matmul shape for the first time since the last step was reported:
    :class:`qvl.train.track.Throughput` leaves such steps out of tok/s and ETA. Compilations are dynamo's graph count
    (a backward compiles in the step whose forward compiled); recordings, the CUDA graphs' (``graphs``: a
    DecoderGraphs, or None); matmul shapes, those ``loss_module.shapes_met`` holds (gemm_row_multiple on a GPU)."""

    def __init__(self, graphs=None, loss_module=None, background=None):
        self.graphs, self.loss_module, self.background = graphs, loss_module, background
        self.last = self._counts()
        self.background_said = False

    def _counts(self) -> tuple[int, int, int]:
        from torch._dynamo.utils import counters

        return (counters["stats"]["unique_graphs"], self.graphs.recorded if self.graphs is not None else 0,
                len(getattr(self.loss_module, "shapes_met", ())))

    def since_last(self) -> str:
        """'compiled 2 graphs, recorded 1 row shape, met 3 matmul shapes' since the previous call; '' when none."""
        now = self._counts()
        new = [b - a for a, b in zip(self.last, now)]
        self.last = now
        what = ("compiled {} graph", "recorded {} row shape", "met {} new matmul shape")
        said = [w.format(n) + "s" * (n != 1) for w, n in zip(what, new) if n > 0]
        tower = self.background
        if tower is not None and tower.started and not self.background_said:  # compiling in another thread: the
            if tower.done.is_set():  # steps run it uncompiled, and the compile holds the GIL half the time
                said.append(tower.status())
                self.background_said = True
            else:
                said.append(f"{tower.what} compiling in the background")
        return ", ".join(said)


def first_step_line(since_start: float, load: float, ahead: float, step: float, compiling: float,
                    recording: float, cached: tuple[int, int] = (0, 0),
                    functions: list[tuple[str, float]] = ()) -> str:
    """Where the wait for the first step went: model load, shapes met ahead, and the first step itself with what
    torch.compile and the CUDA-graph recordings took of it (what the step did apart from those: the rest);
    ``cached``: (graphs taken from the compile cache, graphs) -- a cold cache is why a first run waits longest;
    ``functions``: (what, seconds) compiled, as :func:`qvl.train.compile.compiled_functions` gives them."""
    parts = [f"model load {load:.0f} s"] + ([f"shapes met ahead {ahead:.0f} s"] if ahead >= 1 else [])
    hits, graphs = cached
    split = ", ".join(f"{what} {s:.0f} s" for what, s in functions if s >= 1)
    how = ("" if not graphs else f"{hits} of {graphs} graphs from the compile cache" if hits
           else "none in the compile cache yet: the next run of this config reuses them")
    how = f" ({'; '.join(filter(None, (split, how)))})" if split or how else ""
    inside = [f"{what} {s:.0f} s" + (how if what == "compiling" else "")
              for what, s in (("compiling", compiling), ("recording CUDA graphs", recording)) if s >= 1]
    if inside:
        inside.append(f"the rest {max(step - compiling - recording, 0.0):.0f} s")
    parts.append(f"first step {step:.0f} s" + (f": {', '.join(inside)}" if inside else ""))
    return f"first step done {since_start:.0f} s after start ({'; '.join(parts)})"


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_metrics(metrics_path: Path, out: Path) -> Path | None:
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    lr = [r["lr"] for r in rows]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
        a.plot(steps, loss, lw=1)
        a.set_ylabel("loss")
        a.grid(alpha=0.3)
        b.plot(steps, lr, lw=1, color="tab:orange")
        b.set_ylabel("lr")
        b.set_xlabel("step")
        b.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
    except ImportError:
        return _plot_pil(steps, loss, lr, out)


def _plot_pil(steps, loss, lr, out: Path) -> Path:
    """A plain line chart (loss on top, lr below) with Pillow only."""
    from PIL import Image, ImageDraw

    w, h, m = 800, 600, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)

    def panel(values, top, bottom, colour, label):
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1e-12
        x0, x1 = m, w - 20
        s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
        d.rectangle([x0, top, x1, bottom], outline="black")
        pts = [(x0 + (s - s0) / (s1 - s0) * (x1 - x0), bottom - (v - lo) / (hi - lo) * (bottom - top))
               for s, v in zip(steps, values)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((5, top), f"{hi:.3g}", fill="black")
        d.text((5, bottom - 10), f"{lo:.3g}", fill="black")
        d.text((x0 + 5, top + 5), label, fill=colour)

    panel(loss, 20, 400, (31, 119, 180), "loss")
    panel(lr, 430, h - 40, (255, 127, 14), "lr")
    d.text((m, h - 30), f"step {min(steps)}", fill="black")
    d.text((w - 120, h - 30), f"step {max(steps)}", fill="black")
    img.save(out)
    return out
