"""``qvl data check``: find every problem in a dataset before any GPU time is spent.

Structure is checked in the main process (cheap). Media decoding and exact token lengths run
in worker processes, each with its own processor; a per-sample timeout turns a decoder that
hangs on a bad file into a reported problem instead of a stuck run. Results are cached by
(record, media file stamps, budgets, processor), so re-checking an unchanged dataset is fast.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from qvl.config.vision import VisionBudget
from qvl.data.registry import RawRecord
from qvl.data.samples import Problem, Sample, parse_sample

BBOX_MAX = 1000


@dataclass
class CheckResult:
    index: int
    length: int | None
    problems: list[Problem]
    kinds: tuple[int, int] = (0, 0)  # (images, videos)


@dataclass
class CheckReport:
    records: list[RawRecord]
    results: list[CheckResult]
    seconds: float
    cached: int = 0
    max_length: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bad(self) -> list[CheckResult]:
        return [r for r in self.results if r.problems]

    @property
    def ok(self) -> bool:
        return not self.bad

    def problems(self) -> list[tuple[RawRecord, Problem]]:
        return [(self.records[r.index], p) for r in self.results for p in r.problems]

    def lengths(self) -> list[int]:
        return [r.length for r in self.results if r.length is not None]


# ---------------------------------------------------------------- per-sample checks (worker side)

_STATE: dict = {}


def _init_worker(model: str, budget: dict, max_length: int | None, records: list[RawRecord] | None = None):
    import torch

    from qvl.models.load import load_processor

    torch.set_num_threads(1)
    _STATE.update(processor=load_processor(model), budget=VisionBudget(**budget), max_length=max_length)
    if records is not None:
        _STATE["records"] = records


def _bbox_problems(sample: Sample) -> list[Problem]:
    try:
        from qvl.data.grounding import parse_grounding
    except ImportError:  # grounding helpers not installed: skip this check
        return []
    out = []
    for t, msg in enumerate(sample.messages):
        if msg.role != "assistant" or ("bbox_2d" not in msg.text and "point_2d" not in msg.text):
            continue
        for item in parse_grounding(msg.text):
            for key in ("bbox_2d", "point_2d"):
                values = item.get(key) if isinstance(item, dict) else None
                if values is None:
                    continue
                bad = [v for v in values if not isinstance(v, (int, float)) or not 0 <= v <= BBOX_MAX]
                if bad:
                    out.append(Problem(sample.index, f"turn {t} {key}", f"values {values} outside 0..{BBOX_MAX}",
                                       "Qwen3-VL boxes are relative integers 0-1000: convert with `qvl data bbox`"))
                elif key == "bbox_2d" and len(values) == 4 and (values[0] > values[2] or values[1] > values[3]):
                    out.append(Problem(sample.index, f"turn {t} {key}", f"box {values} has x1 > x2 or y1 > y2",
                                       "write boxes as [x1, y1, x2, y2] with x1 <= x2, y1 <= y2"))
    return out


def check_sample(sample: Sample, processor, budget: VisionBudget, max_length: int | None) -> CheckResult:
    """Decode every media item, then count tokens exactly; every problem is reported."""
    from qvl.data.media import load_image
    from qvl.data.preprocess import count_tokens, decode_video
    from qvl.errors import QvlError

    problems = _bbox_problems(sample)
    counters = {"image": 0, "video": 0}
    decoded_videos = []
    for m in sample.media():
        i = counters[m.kind]
        counters[m.kind] += 1
        try:
            if m.kind == "image":
                img = load_image(m.source)
                ratio = max(img.size) / max(1, min(img.size))
                if ratio > 200:
                    raise QvlError(f"aspect ratio {ratio:.0f}:1 is above Qwen's limit of 200:1")
            else:
                decoded_videos.append(decode_video(m, budget, processor))
        except QvlError as e:
            problems.append(Problem(sample.index, f"{m.kind}[{i}]", e.what,
                                    "fix or remove the file, or drop the sample (--write-valid)"))
    kinds = (counters["image"], counters["video"])
    if problems:
        return CheckResult(sample.index, None, problems, kinds)
    try:
        length = count_tokens(sample, processor, budget, decoded_videos)
    except QvlError as e:
        return CheckResult(sample.index, None, [Problem(sample.index, "media", e.what, e.fix or "check the media")], kinds)
    if max_length and length > max_length:
        problems.append(Problem(sample.index, "length", f"{length} tokens after vision expansion > max length {max_length}",
                                "raise --max-length / model_max_length or lower max_pixels, video_max_pixels, "
                                "video_max_frames; long samples are skipped in training, never cut"))
    return CheckResult(sample.index, length, problems, kinds)


def _work(job: tuple[int, Sample]) -> CheckResult:
    index, sample = job
    try:
        return check_sample(sample, _STATE["processor"], _STATE["budget"], _STATE["max_length"])
    except Exception as e:  # a bug or an exotic decoder failure must not kill the whole check
        return CheckResult(index, None, [Problem(index, "sample", f"unexpected {type(e).__name__}: {e}",
                                                 "report this sample to the qvl developers")])


# ---------------------------------------------------------------- cache

def _cache_path() -> Path:
    from qvl.utils.fs import cache_dir

    return cache_dir() / "check.sqlite"


def _stamp(path) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def _key(rec: RawRecord, sample: Sample, context: str) -> str:
    h = hashlib.sha256(context.encode())
    h.update(json.dumps(rec.raw, sort_keys=True, ensure_ascii=False, default=str).encode())
    h.update(str(rec.data_path).encode())
    for m in sample.media():
        files = m.source if isinstance(m.source, tuple) else (m.source,) if m.is_file else ()
        h.update(f"{m.source}|{'|'.join(_stamp(f) for f in files)}".encode())
    return h.hexdigest()


class _Cache:
    def __init__(self, enabled: bool):
        self.db = None
        if enabled:
            try:
                self.db = sqlite3.connect(_cache_path())
                self.db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, length INTEGER, kinds TEXT)")
            except sqlite3.Error:
                self.db = None  # a read-only home must not stop the check

    def get(self, key: str):
        if self.db is None:
            return None
        row = self.db.execute("SELECT length, kinds FROM results WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], tuple(json.loads(row[1])))

    def put(self, key: str, length: int, kinds) -> None:
        if self.db is not None:
            self.db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (key, length, json.dumps(list(kinds))))

    def close(self) -> None:
        if self.db is not None:
            self.db.commit()
            self.db.close()


# ---------------------------------------------------------------- driver

def _processor_identity(model: str) -> str:
    p = Path(model)
    files = [p / n for n in ("tokenizer.json", "processor_config.json", "preprocessor_config.json",
                             "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json")]
    return str(p.resolve()) + "|" + "|".join(_stamp(f) for f in files) if p.exists() else model


def _run_pool(jobs: list[tuple[int, Sample]], model: str, budget: VisionBudget, max_length, workers: int,
              timeout: float, on_result) -> None:
    """Run jobs in worker processes; a job that exceeds ``timeout`` is reported and its pool replaced."""
    ctx = mp.get_context("fork")
    pending = list(jobs)
    while pending:
        pool = ctx.Pool(workers, _init_worker, (model, budget.to_dict(), max_length))
        try:
            futures = [(job, pool.apply_async(_work, (job,))) for job in pending]
            pending = []
            for n, (job, fut) in enumerate(futures):
                try:
                    on_result(fut.get(timeout=timeout))
                except mp.TimeoutError:
                    index = job[0]
                    on_result(CheckResult(index, None, [Problem(
                        index, "media", f"decoding took longer than {timeout:.0f}s (corrupt or huge file?)",
                        "re-encode the file (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4) or raise --timeout")]))
                    # The stuck worker cannot be interrupted: keep what finished, rerun the rest in a new pool.
                    for other, f in futures[n + 1:]:
                        if f.ready():
                            on_result(f.get())
                        else:
                            pending.append(other)
                    break
        finally:
            pool.terminate()
            pool.join()


def flatten_packs(records: list[RawRecord]) -> list[RawRecord]:
    """Packed files hold a list of samples per record: check each sample on its own."""
    out = []
    for rec in records:
        if isinstance(rec.raw, list):
            out.extend(RawRecord(sub, rec.data_path, f"{rec.dataset}:{rec.index}", j) for j, sub in enumerate(rec.raw))
        else:
            out.append(rec)
    return out


def check_records(records: list[RawRecord], model: str, budget: VisionBudget | None = None,
                  max_length: int | None = 8192, workers: int | None = None, timeout: float = 60.0,
                  use_cache: bool = True, progress=None) -> CheckReport:
    """Check every record. ``progress(n_done)`` is called as results arrive."""
    from qvl.models.load import resolve

    budget = budget or VisionBudget()
    start = time.perf_counter()
    records = flatten_packs(records)
    model = str(resolve(model))
    results: dict[int, CheckResult] = {}
    jobs: list[tuple[int, Sample]] = []
    cache = _Cache(use_cache)
    context = f"{_processor_identity(model)}|{json.dumps(budget.to_dict(), sort_keys=True)}|{max_length}|v1"
    keys: dict[int, str] = {}
    cached = 0
    for i, rec in enumerate(records):
        sample, problems = parse_sample(rec.raw, i, rec.data_path, rec.origin)
        if sample is None:
            results[i] = CheckResult(i, None, problems)
            continue
        keys[i] = _key(rec, sample, context)
        hit = cache.get(keys[i])
        if hit is not None:
            results[i] = CheckResult(i, hit[0], list(problems), hit[1])
            cached += 1
        else:
            jobs.append((i, sample))
    if progress:
        progress(len(results))

    def collect(res: CheckResult) -> None:
        results[res.index] = res
        if not res.problems and res.length is not None and res.index in keys:
            cache.put(keys[res.index], res.length, res.kinds)
        if progress:
            progress(len(results))

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    try:
        if jobs and workers == 1 and timeout <= 0:
            _init_worker(model, budget.to_dict(), max_length)
            for job in jobs:
                collect(_work(job))
        elif jobs:
            _run_pool(jobs, model, budget, max_length, workers, timeout, collect)
    finally:
        cache.close()
    ordered = [results[i] for i in range(len(records))]
    return CheckReport(records, ordered, time.perf_counter() - start, cached, max_length)


def summarize(report: CheckReport) -> dict:
    lengths = report.lengths()
    n = len(report.results)
    images = sum(1 for r in report.results if r.kinds[0] and not r.kinds[1])
    videos = sum(1 for r in report.results if r.kinds[1] and not r.kinds[0])
    mixed = sum(1 for r in report.results if r.kinds[0] and r.kinds[1])
    return {
        "samples": n,
        "valid": n - len(report.bad),
        "invalid": len(report.bad),
        "problems": sum(len(r.problems) for r in report.results),
        "image_samples": images,
        "video_samples": videos,
        "mixed_samples": mixed,
        "text_only_samples": sum(1 for r in report.results if r.kinds == (0, 0) and r.length is not None),
        "tokens_min": min(lengths) if lengths else None,
        "tokens_median": int(statistics.median(lengths)) if lengths else None,
        "tokens_max": max(lengths) if lengths else None,
        "tokens_total": sum(lengths),
        "max_length": report.max_length,
        "cached": report.cached,
        "seconds": round(report.seconds, 2),
        "samples_per_minute": round(60 * n / report.seconds) if report.seconds > 0 else None,
    }
