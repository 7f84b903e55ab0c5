"""The loop: token-weighted accumulation, exact kill-and-resume, crash-safe checkpoints, servable output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvl.train import checkpoint as ckpt
from qvl.train.loop import train
from qvl.train.track import read_metrics


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl")]


def test_accumulation_is_token_weighted(make_cfg, tmp_path):
    """bs 4 x 1 and bs 1 x 4 see the same samples in one step: same loss, same gradient."""
    a = train(make_cfg(per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=1,
                       output_dir=str(tmp_path / "a"), save_strategy="no"), log=lambda *_: None)
    b = train(make_cfg(per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=1,
                       output_dir=str(tmp_path / "b"), save_strategy="no"), log=lambda *_: None)
    assert a.losses[0] == pytest.approx(b.losses[0], rel=1e-5)
    ga = read_metrics(tmp_path / "a" / "metrics.jsonl")[0]["grad_norm"]
    gb = read_metrics(tmp_path / "b" / "metrics.jsonl")[0]["grad_norm"]
    assert ga == pytest.approx(gb, rel=1e-4)  # same gradient, not a mean of per-micro-batch means


def test_kill_and_resume_gives_identical_losses(make_cfg, tmp_path):
    """LoRA with dropout (RNG in play) + full merger; killed after step 5, re-run resumes from checkpoint-4."""
    kw = dict(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.1, tune_mm_llm=False, tune_mm_mlp=True,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=7, save_steps=2,
              lr_scheduler_type="cosine", warmup_ratio=0.2)
    full = train(make_cfg(output_dir=str(tmp_path / "full"), **kw), log=lambda *_: None)

    def kill(step, row):
        if step == 5:
            raise KeyboardInterrupt

    cfg = make_cfg(output_dir=str(tmp_path / "killed"), **kw)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda *_: None, callbacks=[kill])
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "checkpoint-4"
    again = train(cfg, log=lambda *_: None)
    assert again.start_step == 4 and again.resumed_from.endswith("checkpoint-4")
    assert losses(tmp_path / "killed") == full.losses  # bit-identical curve, rows after step 4 replaced
    assert len(losses(tmp_path / "killed")) == 7


def test_checkpoint_interrupted_mid_write_is_ignored(make_cfg, tmp_path):
    cfg = make_cfg(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2)
    train(cfg, log=lambda *_: None)
    out = tmp_path / "run"
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    # a save killed before its marker: the temp folder stays, resume never sees it
    from qvl.models.load import load_model
    from qvl.train import components as C

    model = C.apply_training_mode(load_model(cfg.model_name_or_path), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(out, 6, model, opt, sched, {"step": 6}, _crash_before_marker=True)
    assert any(p.name.startswith(".checkpoint-6.tmp") for p in out.iterdir())
    # a checkpoint folder whose files were cut short (e.g. a copy killed half-way)
    half = out / "checkpoint-8"
    (half).mkdir()
    for f in (out / "checkpoint-4").iterdir():
        (half / f.name).write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    assert not ckpt.is_complete(half)
    assert ckpt.latest_checkpoint(out).name == "checkpoint-4"
    # re-running with more steps resumes from the newest complete one
    again = train(make_cfg(output_dir=str(out), max_steps=5, save_steps=2), log=lambda *_: None)
    assert again.start_step == 4 and again.steps == 5


def test_resume_with_other_optimizer_groups_is_a_message(make_cfg, tmp_path):
    from qvl.errors import QvlError

    out = tmp_path / "run"
    train(make_cfg(output_dir=str(out), max_steps=1, save_steps=1), log=lambda *_: None)
    with pytest.raises(QvlError, match="resume=false"):  # was a ValueError from torch (group count)
        train(make_cfg(output_dir=str(out), max_steps=2, save_steps=1, weight_decay=0.1), log=lambda *_: None)


def test_resume_false_starts_fresh_and_deletes_nothing(make_cfg, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(output_dir=str(out), max_steps=2, save_steps=1), log=lambda *_: None)
    before = sorted(p.name for p in out.iterdir())
    r = train(make_cfg(output_dir=str(out), max_steps=2, save_steps=1, resume=False), log=lambda *_: None)
    assert r.start_step == 0 and r.resumed_from is None
    archived = list((out / "previous").iterdir())
    assert len(archived) == 1 and sorted(p.name for p in archived[0].iterdir()) == before


def test_full_output_is_servable_with_inference_budgets(make_cfg, tmp_path, tiny):
    from qvl.models.load import load

    out = tmp_path / "run"
    train(make_cfg(output_dir=str(out), max_steps=1, save_strategy="no"), log=lambda *_: None)
    model, processor = load(out)
    # training used max_pixels=4096; the saved processor keeps the model's own budgets
    assert processor.image_processor.size == tiny[1].image_processor.size
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert model.config.text_config.use_cache is True


def test_lora_output_is_adapter_plus_base_reference(make_cfg, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    train(make_cfg(output_dir=str(out), max_steps=2, save_strategy="no", lora_enable=True, lora_r=4,
                   lora_alpha=8, tune_mm_llm=False, tune_mm_mlp=True), log=lambda *_: None)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert not (out / "config.json").exists()
    model, processor = ckpt.load_trained(out)
    assert processor.tokenizer is not None
    model, _ = ckpt.load_trained(out, merge=True)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_learns_colours(make_cfg, tmp_path, tiny_model_dir):
    """The CPU learning test: the tiny model reads the image colour after ~30 steps."""
    from train_helpers import COLOURS, QUESTION, make_colour_data

    from qvl.data.collate import collate
    from qvl.data.preprocess import encode
    from qvl.data.samples import parse_sample
    from qvl.models.load import load
    from qvl.models.tokens import token_ids

    out = tmp_path / "run"
    train(make_cfg(output_dir=str(out), max_steps=30, per_device_train_batch_size=8, tune_mm_vision=True,
                   save_strategy="no"), log=lambda *_: None)
    model, processor = load(out)
    held = make_colour_data(tmp_path / "held", 16, seed=123)
    ids = token_ids(processor.tokenizer)
    words = {c: processor.tokenizer.encode(c, add_special_tokens=False)[0] for c in COLOURS}
    hits = 0
    budget = make_cfg().vision_budget()
    for line in Path(held).read_text().splitlines():
        raw = json.loads(line)
        answer = raw["conversations"][1]["value"]
        raw["conversations"] = raw["conversations"][:1]
        raw["conversations"].append({"from": "gpt", "value": "x"})
        sample, _ = parse_sample(raw, 0, Path(held).parent)
        sample.messages = sample.messages[:1]
        enc = encode(sample, processor, budget, for_generation=True)
        with torch.no_grad():
            logits = model(**collate([enc], ids.pad)).logits[0, -1]
        pick = max(words, key=lambda c: logits[words[c]])
        hits += pick == answer
    assert hits / 16 >= 0.9
    assert QUESTION


def test_mixed_text_and_image_batches(make_cfg, tmp_path):
    from train_helpers import make_colour_data

    data = make_colour_data(tmp_path / "mixed", 6, text_only=6)
    r = train(make_cfg(dataset_use=data, output_dir=str(tmp_path / "run"), tune_mm_vision=True, max_steps=3,
                       per_device_train_batch_size=2, save_strategy="no"), log=lambda *_: None)
    assert len(r.losses) == 3 and all(torch.isfinite(torch.tensor(r.losses)))


@pytest.mark.parametrize("workers", [0, 1])
def test_too_long_is_skipped_and_reported(make_cfg, tmp_path, workers):
    from qvl.errors import QvlError

    said = []
    r = train(make_cfg(output_dir=str(tmp_path / "a"), model_max_length=20, max_steps=1, save_strategy="no",
                       per_device_train_batch_size=2, dataloader_num_workers=workers), log=said.append)
    assert r.skipped.get("longer than model_max_length") == 2
    assert any("e.g." in line for line in said), said  # an example, also from a worker
    with pytest.raises(QvlError, match="too_long") as e:
        train(make_cfg(output_dir=str(tmp_path / "b"), model_max_length=20, max_steps=1, too_long="error",
                       dataloader_num_workers=workers), log=lambda *_: None)
    # from a DataLoader worker too: the message names the sample, it is not a traceback in a string
    assert "Traceback" not in e.value.render() and e.value.where.endswith(tuple(f"train.jsonl:{i}" for i in range(32)))


def test_logged_lr_is_the_llm_lr_each_step_used(make_cfg, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(output_dir=str(out), max_steps=2, save_strategy="no", tune_mm_vision=True, learning_rate=1e-3,
                   vision_tower_lr=1e-4, lr_scheduler_type="linear"), log=lambda *_: None)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 5e-4])  # not the vision group's, not the next step's
    assert [r["lr/vision/no_decay"] for r in rows] == pytest.approx([1e-4, 5e-5])


def test_rerun_without_checkpoints_keeps_the_earlier_model(make_cfg, tmp_path):
    """resume=true with nothing to resume starts fresh, moving an earlier run's output aside (never over it)."""
    out = tmp_path / "run"
    train(make_cfg(output_dir=str(out), max_steps=1, save_strategy="no"), log=lambda *_: None)
    first = (out / "model.safetensors").read_bytes()
    said = []
    r = train(make_cfg(output_dir=str(out), max_steps=1, save_strategy="no", learning_rate=1e-2), log=said.append)
    assert r.start_step == 0 and any("moved to" in line for line in said)
    (archived,) = (out / "previous").iterdir()
    assert (archived / "model.safetensors").read_bytes() == first
    assert (out / "model.safetensors").read_bytes() != first


def test_official_entry_point(tiny_model_dir, colour_data, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "qvl.train", "--model_name_or_path", str(tiny_model_dir),
                        "--dataset_use", colour_data, "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
                        "--max_steps", "2", "--per_device_train_batch_size", "2", "--output_dir", str(out),
                        "--report_to", "tensorboard", "--max_pixels", "4096", "--min_pixels", "4096",
                        "--data_flatten", "True", "--logging_steps", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "trainable" in p.stdout and "step 2/2" in p.stdout
    assert (out / "model.safetensors").is_file() and (out / "loss.png").is_file()
    assert any((out / "tensorboard").iterdir())


def test_master_weights_fp32_keeps_updates_bf16_rounds_away(make_cfg, tmp_path, tiny_model_dir):
    """Full fine-tuning with bf16: each AdamW step moves a weight by ~lr (1e-5), under half of bf16's spacing at
    |w| ~ 0.02, so pure bf16 weights round back every step; fp32 master weights add the steps up."""
    from safetensors.torch import load_file

    from qvl.train.loop import train

    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    base = load_file(str(tiny_model_dir / "model.safetensors"))[name].to(torch.bfloat16)
    changed = {}
    for master in ("bf16", "fp32"):
        logs = []
        cfg = make_cfg(bf16=True, master_weights=master, learning_rate=1e-5, max_steps=6, tune_mm_mlp=False,
                       output_dir=str(tmp_path / master), save_strategy="no", max_grad_norm=0.0)
        train(cfg, log=logs.append)
        w = load_file(str(tmp_path / master / "model.safetensors"))[name]
        assert w.dtype == torch.bfloat16  # saved in the model's dtype either way
        changed[master] = (w != base).float().mean().item()
        assert any("updates smaller than bf16" in str(line) for line in logs) == (master == "bf16")
    assert changed["fp32"] > 2 * changed["bf16"] and changed["fp32"] > 0.3, changed  # measured: 0.44 vs 0.15


def test_packed_rows_built_in_workers_train_the_same(make_cfg, tmp_path, monkeypatch):
    """data_flatten: a DataLoader worker computes the positions and packs the row (RopeIndex pickled over to it);
    the losses equal packing in the main process (packed_row_tokens over two micro-batches regroups the step's
    samples there), and rows regrouped by a small packed_row_tokens in the loader (one micro-batch per step)."""
    from qvl.train import batches

    built = []
    pack = batches.pack_micro_batch
    monkeypatch.setattr(batches, "pack_micro_batch", lambda encs, *a, **k: built.append(len(encs)) or pack(encs, *a, **k))
    runs = {}
    for name, kw in (("worker", dict(dataloader_num_workers=1)),
                     ("main", dict(packed_row_tokens=100_000, per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2)),
                     ("budget", dict(packed_row_tokens=40, dataloader_num_workers=0))):
        built.clear()
        runs[name] = train(make_cfg(output_dir=str(tmp_path / name), data_flatten=True, max_steps=3,
                                    save_strategy="no", **kw), log=lambda *_: None).losses
        if name == "main":
            assert built == [4, 4, 4]  # one row of the step's four samples, packed in this process
        if name == "budget":
            assert len(built) > 3 and max(built) == 1, built  # each sample (> 40 tokens) a row of its own
    assert runs["worker"] == pytest.approx(runs["main"], rel=1e-5)
    assert runs["budget"] == pytest.approx(runs["main"], rel=1e-4)


def test_recompute_scope_mlp_trains_the_same(make_cfg, tmp_path):
    """gradient_checkpointing_scope=mlp through the loop (eager on CPU): the losses of recomputing whole layers, and
    the log says what it kept."""
    runs, said = {}, []
    for scope in ("layer", "mlp"):
        runs[scope] = train(make_cfg(output_dir=str(tmp_path / scope), data_flatten=True, max_steps=3,
                                     save_strategy="no", gradient_checkpointing=True, lora_enable=True, lora_r=8,
                                     tune_mm_llm=False, gradient_checkpointing_scope=scope), log=said.append).losses
    assert runs["mlp"] == pytest.approx(runs["layer"], rel=1e-5)
    assert any("gradient_checkpointing_scope=mlp: 2 recomputed layers keep their attention half" in s for s in said)


def test_a_step_is_read_once_the_next_is_queued(make_cfg, tmp_path, monkeypatch):
    """The loop reads a step's loss (a host sync) after it has queued the next step, so the GPU is not idle while
    the host reads and prepares; a checkpoint's step is read before it is saved, the last step after the loop. The
    numbers are the steps' own: the logged losses are the run's, in order."""
    from qvl.train import distributed, host
    from qvl.train.track import read_metrics

    events = []
    micro_step = distributed.micro_step
    monkeypatch.setattr(distributed, "micro_step", lambda *a, **k: events.append("run") or micro_step(*a, **k))
    save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda out, step, *a, **k: events.append(f"save {step}") or
                        save(out, step, *a, **k))
    queue = host.queue_host_read
    monkeypatch.setattr(host, "queue_host_read", lambda *v: events.append("copy") or queue(*v))
    r = train(make_cfg(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, save_strategy="steps"),
              log=lambda *_: None, callbacks=[lambda step, row: events.append(f"read {step}")])
    # each step's copy to the host is queued right behind its own work (before the next step's), so its read
    # waits for that step only
    assert events == ["run", "copy", "run", "copy", "read 1", "read 2", "save 2",
                      "run", "copy", "run", "copy", "read 3", "read 4", "save 4"], events
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and [m["loss"] for m in logged] == r.losses


def test_running_out_of_gpu_memory_says_what_to_change(make_cfg, monkeypatch):
    """An out-of-memory error in a step is a QvlError naming the settings that lower memory (cuda_graphs first when
    it is on), not a bare CUDA traceback; the run's files are left as they are."""
    from qvl.errors import QvlError
    from qvl.train import distributed
    from qvl.train.loop import out_of_memory

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(distributed, "micro_step", boom)
    with pytest.raises(QvlError, match="ran out of memory") as e:
        train(make_cfg(max_steps=2, save_strategy="no"), log=lambda *_: None)
    assert "Tried to allocate 2.00 GiB" in e.value.what and "per_device_train_batch_size" in e.value.fix
    cfg = make_cfg(gradient_checkpointing=True)
    err = out_of_memory(torch.OutOfMemoryError("CUDA out of memory"), cfg, True, 0.5)
    assert err.fix.startswith("cuda_graphs=false") and "gradient_checkpointing_ratio=1.0" in err.fix
    assert "gradient_checkpointing=true" in out_of_memory(RuntimeError("x"), make_cfg(), False, 1.0).fix


def test_gemm_row_multiple_trains_like_plain(make_cfg, tmp_path):
    """gemm_row_multiple on the packed-row path (padding images in the tower, padded loss-head rows): the plain
    run's losses, and the log says what was padded."""
    from train_helpers import make_colour_data

    data = make_colour_data(tmp_path / "data", 8, seed=7, text_only=2)
    kw = dict(dataset_use=data, data_flatten=True, tune_mm_llm=False, lora_enable=True, packed_attention="per_sample",
              per_device_train_batch_size=4, max_steps=3, save_strategy="no", compile_layers=False)
    plain = train(make_cfg(output_dir=str(tmp_path / "plain"), **kw), log=lambda *_: None)
    said = []
    padded = train(make_cfg(output_dir=str(tmp_path / "padded"), gemm_row_multiple=24, **kw), log=said.append)
    assert any(line.startswith("gemm_row_multiple=24: the loss head's label rows and each medium's vision-tower "
                               "patches") for line in said), said
    assert not any(line.startswith("gemm_row_multiple: ran the loss head") for line in said)  # met as they come
    assert padded.losses == pytest.approx(plain.losses, rel=1e-4)
    said = []
    ahead = train(make_cfg(output_dir=str(tmp_path / "ahead"), gemm_row_multiple=24, warmup_shapes="ahead", **kw),
                  log=said.append)
    assert any(line.startswith("gemm_row_multiple: ran the loss head at its") for line in said), said
    assert ahead.losses == pytest.approx(plain.losses, rel=1e-4)


def test_host_embeddings_train_like_plain(make_cfg, tmp_path):
    """host_embeddings: rows looked up in the host-memory table give the plain run's losses; off the packed-row path
    the error names the flag."""
    from train_helpers import make_colour_data

    from qvl.errors import QvlError

    data = make_colour_data(tmp_path / "data", 8, seed=7, text_only=2)
    kw = dict(dataset_use=data, data_flatten=True, tune_mm_llm=False, lora_enable=True, packed_attention="per_sample",
              per_device_train_batch_size=4, max_steps=3, save_strategy="no", compile_layers=False)
    cfg = make_cfg(output_dir=str(tmp_path / "plain"), **kw)
    plain = train(cfg, log=lambda *_: None)
    said = []
    host = train(make_cfg(output_dir=str(tmp_path / "host"), host_embeddings=True, **kw), log=said.append)
    assert any(line.startswith("host_embeddings: the input-embedding table") for line in said), said
    assert host.losses == pytest.approx(plain.losses, rel=1e-5)
    with pytest.raises(QvlError, match="per_sample") as e:
        train(make_cfg(output_dir=str(tmp_path / "sdpa"), host_embeddings=True, **dict(kw, packed_attention="sdpa")),
              log=lambda *_: None)
    assert e.value.where == "host_embeddings"


def test_a_disk_too_small_stops_the_run_before_training(make_cfg, tmp_path, monkeypatch):
    """The first checkpoint would not fit: the run stops at start-up, naming output_dir and both sizes."""
    from qvl.errors import QvlError
    from qvl.utils import fs

    monkeypatch.setattr(fs, "free_bytes", lambda folder: 1000)
    steps = []
    with pytest.raises(QvlError) as e:
        train(make_cfg(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1), log=lambda *_: None,
              callbacks=[lambda step, row: steps.append(step)])
    assert steps == [] and "not enough disk space" in str(e.value) and "output_dir" in str(e.value)
    assert "GiB free" in str(e.value) and "checkpoint" in str(e.value)


def test_running_out_of_disk_at_a_save_is_said_and_leaves_no_partial_files(make_cfg, tmp_path, monkeypatch):
    """A write that fails for want of space is said as such, names the last complete checkpoint, and leaves no
    half-written folder behind; the earlier checkpoint stays."""
    import errno

    from qvl.errors import QvlError

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint's optimizer.pt hits a full disk
        if str(f).endswith("optimizer.pt"):
            calls.append(f)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(QvlError) as e:
        train(make_cfg(output_dir=str(out), max_steps=4, save_steps=2), log=lambda *_: None)
    assert "not enough disk space for checkpoint-4" in str(e.value) and "checkpoint-2" in str(e.value)
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-2"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_disk_full_errors_are_told_apart():
    """safetensors' Rust writer raises its own error type, the OS error only in its text."""
    import errno

    from qvl.utils.fs import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_disk_needed_counts_checkpoints_kept_at_once():
    from qvl.train.preflight import disk_needed

    gib = 2**30
    first, most, how = disk_needed(2 * gib, 8 * gib, False, 0, 100, "steps", 10, 2)
    assert first == 6 * gib and most == 3 * 6 * gib + 8 * gib and "3 checkpoints" in how  # a new one before pruning
    assert disk_needed(gib, 8 * gib, True, 0, 100, "steps", 500, None)[1] == 3 * gib + gib  # one save, adapters
    assert disk_needed(gib, 8 * gib, True, 0, 100, "steps", 40, None)[1] == 3 * 3 * gib + gib  # 40, 80, 100
    assert disk_needed(gib, 8 * gib, True, 50, 100, "steps", 40, None)[1] == 2 * 3 * gib + gib  # resumed: 80, 100
    assert disk_needed(gib, 8 * gib, False, 100, 100, "steps", 40, None)[:2] == (8 * gib, 8 * gib)  # nothing left
    assert disk_needed(gib, 8 * gib, False, 0, 100, "no", 500, None)[:2] == (8 * gib, 8 * gib)


def test_other_errors_in_a_write_are_not_called_disk_full(tmp_path, monkeypatch):
    """Only a write that ran out of space is said to have: a write that needs most of what is free and fails for
    another reason keeps its own error."""
    from qvl.utils import fs

    monkeypatch.setattr(fs, "free_bytes", lambda folder: 10 * 2**30)
    with pytest.raises(KeyError):
        with fs.disk_space_for(tmp_path, "x", 9 * 2**30, fix="f"):
            raise KeyError("not a disk problem")


def test_running_out_of_disk_at_the_final_save_leaves_no_partial_model(make_cfg, tmp_path, monkeypatch):
    import errno

    from qvl.errors import QvlError

    def write(tmp, *args):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_final", write)
    out = tmp_path / "run"
    with pytest.raises(QvlError) as e:
        train(make_cfg(output_dir=str(out), max_steps=1, save_strategy="no"), log=lambda *_: None)
    assert "not enough disk space for the trained model" in str(e.value)
    assert not list(out.glob(".final.tmp-*")) and not (out / "model.safetensors").exists()
