"""Several ranks: engine choice, LR groups under every engine, sampler shards, media balancing, and real
2-process gloo runs (FSDP2, DeepSpeed ZeRO-3) that match the 1-process run, resume, and never hang.

In-process DeepSpeed / FSDP runs make a 1-rank gloo process group that stays for the session
(DeepSpeed caches it; every later in-process run reuses it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from train_helpers import run_two_ranks

from qvl.errors import QvlError
from qvl.train import distributed as D
from qvl.train.config import build_config, deepspeed_config, from_argv
from qvl.train.loop import train
from qvl.train.track import read_metrics

ROOT = Path(__file__).resolve().parents[2]
ZERO = {n: str(ROOT / "examples" / "deepspeed" / f"{n}.json") for n in ("zero2", "zero3", "zero3_offload")}
HAS_DS = importlib.util.find_spec("deepspeed") is not None
needs_ds = pytest.mark.skipif(not HAS_DS, reason="DeepSpeed is not installed: `make test` installs it "
                                                  "(DS_BUILD_OPS=0 pip install deepspeed==0.19.8)")
BASE = ["model_name_or_path=m", "dataset_use=d", "tune_mm_llm=true"]


def test_one_key_chooses_the_engine():
    assert from_argv(BASE).engine == "ddp"
    assert from_argv(BASE + [f"deepspeed={ZERO['zero3']}"]).engine == "deepspeed"
    for form in ("full_shard", "full_shard auto_wrap", "true"):
        assert from_argv(BASE + [f"fsdp={form}"]).engine == "fsdp"
    assert from_argv(BASE + ["fsdp="]).engine == "ddp"  # the Trainer's "off"
    with pytest.raises(QvlError, match="fsdp"):
        from_argv(BASE + ["fsdp=shard_grad_op"])
    with pytest.raises(QvlError) as e:
        from_argv(BASE + ["fsdp=full_shard", f"deepspeed={ZERO['zero3']}"])
    assert e.value.where == "fsdp"
    with pytest.raises(QvlError, match="nproc"):
        from_argv(BASE + ["nproc=0"])


def test_zero_1_2_on_one_process_is_single_gpu_training_without_deepspeed():
    """The reference's one-card recipe passes --deepspeed zero2.json: with one rank ZeRO-2 shards nothing, so it runs
    on the single-GPU path (no DeepSpeed install needed); ZeRO-3 and offload keep DeepSpeed, several ranks too."""
    lora = from_argv(BASE[:2] + [f"deepspeed={ZERO['zero2']}", "lora_enable=true", "bf16=true"])
    cfg, note = D.engine_for_ranks(lora, world_size=1)
    assert cfg.engine == "ddp" and cfg.deepspeed is None and cfg.master_weights == "auto"
    assert "ZeRO-2" in note and "without DeepSpeed" in note
    full, note = D.engine_for_ranks(from_argv(BASE + [f"deepspeed={ZERO['zero2']}", "bf16=true"]), world_size=1)
    assert full.engine == "ddp" and full.master_weights == "fp32" and "fp32 master weights" in note  # as DeepSpeed
    for kept, world in ((ZERO["zero3"], 1), (ZERO["zero3_offload"], 1), (ZERO["zero2"], 2)):
        cfg = from_argv(BASE + [f"deepspeed={kept}"])
        assert D.engine_for_ranks(cfg, world) == (cfg, "")
    plain = from_argv(BASE)
    assert D.engine_for_ranks(plain, 1) == (plain, "")


def test_deepspeed_optimizer_block_never_replaces_the_lr_groups(tmp_path):
    official = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                          "weight_decay": "auto"}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                             "warmup_num_steps": "auto"}},
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    p = tmp_path / "official_zero3_offload.json"
    p.write_text(json.dumps(official))
    notes = []
    ds = deepspeed_config(from_argv(BASE + [f"deepspeed={p}"]), notes=notes)
    assert "optimizer" not in ds and "scheduler" not in ds  # all "auto": dropped, and said so
    assert len(notes) == 2 and "per-component" in notes[0]
    official["optimizer"]["params"]["lr"] = 3e-5  # an explicit value: refused, with the key to use instead
    p.write_text(json.dumps(official))
    with pytest.raises(QvlError, match="optimizer") as e:
        deepspeed_config(from_argv(BASE + [f"deepspeed={p}"]))
    assert "learning_rate" in e.value.fix


def test_nproc_relaunches_under_torchrun(monkeypatch):
    cfg = from_argv(BASE + ["nproc=2"])
    for var in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert D.needs_launch(cfg) and not D.needs_launch(from_argv(BASE))
    cmd = D.torchrun_command(["c.yaml", "nproc=2"], 2)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[6:] == ["-m", "qvl.train", "c.yaml", "nproc=2"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # inside torchrun: train, do not launch again
    assert not D.needs_launch(cfg)


def test_relaunch_shares_cpu_threads_unless_set(monkeypatch):
    """torchrun would pin every rank to one OpenMP thread (DeepSpeed's CPU Adam under offload): share the cores."""
    monkeypatch.setattr(D.os, "cpu_count", lambda: 32)
    assert D.cpu_threads_per_process(2, env={}) == "16"
    assert D.cpu_threads_per_process(64, env={}) == "1"
    assert D.cpu_threads_per_process(2, env={"OMP_NUM_THREADS": "4"}) is None  # the user's choice stays


def test_sampler_shards_are_disjoint_and_the_mixture_is_the_same_on_every_rank(tmp_path):
    from train_helpers import make_colour_data

    from qvl.data.registry import load_mixture
    from qvl.train.batches import Plan
    from qvl.train.loop import Dist

    data = make_colour_data(tmp_path / "d", 10, text_only=7)
    mixes = [load_mixture(f"{data}%60", None, seed=3) for _ in range(2)]  # what each rank computes
    assert [r.raw for r in mixes[0]] == [r.raw for r in mixes[1]] and len(mixes[0]) == 10
    cfg = build_config({"model_name_or_path": "m", "dataset_use": "d", "tune_mm_llm": True, "seed": 3,
                        "per_device_train_batch_size": 2})
    orders = [Plan(10, cfg, Dist(r, 3, r)).epoch_order(0) for r in range(3)]
    assert len({len(o) for o in orders}) == 1  # equal work: 4 each, padded like DistributedSampler
    flat = [i for o in orders for i in o]
    assert set(flat) == set(range(10)) and len(flat) == 12
    assert Plan(10, cfg, Dist(0, 3, 0)).epoch_order(0) == orders[0]  # the same order again (resume)
    assert Plan(10, cfg, Dist(0, 3, 0)).micro_per_epoch == 2


def test_fake_media_do_not_change_the_loss(tiny, make_cfg):
    """A label-free image appended after a text-only row (what a rank gets when another rank has images)
    changes neither the loss nor the label count; it makes the model run its vision tower."""
    from qvl.data.collate import collate
    from qvl.data.preprocess import encode
    from qvl.data.samples import parse_sample
    from qvl.models.tokens import token_ids
    from qvl.train.loss_module import LossModule

    model, processor = tiny
    cfg = make_cfg()
    pad = token_ids(processor.tokenizer).pad
    raw = {"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes please"}]}
    enc = encode(parse_sample(raw)[0], processor, cfg.vision_budget())
    short = encode(parse_sample(dict(raw, conversations=raw["conversations"][:1] + [
        {"from": "gpt", "value": "no"}]))[0], processor, cfg.vision_budget())
    batch = collate([enc, short], pad)
    fakes = D.FakeMedia(processor, cfg)
    both = D.append_sample(D.append_sample(batch, fakes["image"], pad), fakes["video"], pad)
    assert D.media_in({"batch": both}) == (True, True) and D.media_in({"batch": batch}) == (False, False)
    assert int((both["labels"] != -100).sum()) == int((batch["labels"] != -100).sum())
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    lm = LossModule(model)
    with torch.no_grad():
        a = lm(dict(batch), 5.0)[1]
        b = lm(dict(both), 5.0)[1]
    hook.remove()
    assert len(calls) == 1 + 2  # text-only: the trainable tower's own dummy run; with fakes: images + videos
    assert float(b) == pytest.approx(float(a), rel=1e-5)


def test_skipped_micro_batch_becomes_a_fake_image(tiny, make_cfg):
    eng = D.Engine("ddp", None, None, None, world_size=2)
    fakes = D.FakeMedia(tiny[1], make_cfg())
    items = D.balance_media(eng, [{"batch": None, "skipped": {"x": 1}}], fakes, "cpu", 0)
    assert D.media_in(items[0]) == (True, False) and (items[0]["batch"]["labels"] == -100).all()
    packed = D.balance_media(D.Engine("ddp", None, None, None, world_size=2, packed=True),
                             [{"batch": None, "skipped": {}}], fakes, "cpu", 0)
    assert packed[0]["samples"] == [fakes["image"]]


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero2", marks=needs_ds), pytest.param("zero3", marks=needs_ds)])
def test_lr_groups_survive_every_engine(engine, make_cfg, tmp_path):
    out = tmp_path / "run"
    key = {"fsdp": "full_shard"} if engine == "fsdp" else {"deepspeed": ZERO[engine]}
    r = train(make_cfg(output_dir=str(out), max_steps=2, save_strategy="no", tune_mm_vision=True,
                       learning_rate=1e-3, vision_tower_lr=1e-4, mm_projector_lr=3e-4, lr_scheduler_type="linear",
                       **key), log=lambda *_: None)
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["lr"] for row in rows] == pytest.approx([1e-3, 5e-4])
    assert [row["lr/vision/no_decay"] for row in rows] == pytest.approx([1e-4, 5e-5])
    assert [row["lr/merger/no_decay"] for row in rows] == pytest.approx([3e-4, 1.5e-4])
    assert len(r.losses) == 2 and all(torch.isfinite(torch.tensor(r.losses)))
    from qvl.models.load import load

    model, _ = load(out)  # the gathered weights make a servable folder
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero2", marks=needs_ds), pytest.param("zero3", marks=needs_ds)])
def test_two_ranks_match_one_resume_and_never_hang_on_mixed_batches(engine, tiny_model_dir, tmp_path):
    """Images on one rank, text on the other (batch 1, trained vision tower): no hang, the 1-rank losses
    (same global batch), a 2-rank resume that continues the same curve, and one servable folder."""
    from train_helpers import make_colour_data

    data = make_colour_data(tmp_path / "mixed", 8, text_only=8)
    key = {"fsdp": "full_shard"} if engine == "fsdp" else {"deepspeed": ZERO[engine]}
    values = {"model_name_or_path": str(tiny_model_dir), "dataset_use": data, "tune_mm_vision": True,
              "tune_mm_mlp": True, "tune_mm_llm": True, "learning_rate": 1e-3, "vision_tower_lr": 1e-4,
              "per_device_train_batch_size": 1, "save_steps": 2, "report_to": "none", "seed": 0,
              "lr_scheduler_type": "constant", "max_pixels": 4096, "min_pixels": 4096, **key}
    one = train(build_config({**values, "gradient_accumulation_steps": 2, "max_steps": 4,
                              "output_dir": str(tmp_path / "one")}), log=lambda *_: None)
    out = tmp_path / "two"
    args = [f"{k}={v}" for k, v in values.items()] + [f"output_dir={out}", "gradient_accumulation_steps=1"]
    p = run_two_ranks([*args, "max_steps=3"])  # saves checkpoint-2 and checkpoint-3 (sharded states)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 ranks" in p.stdout and f"engine {'fsdp' if engine == 'fsdp' else 'deepspeed ZeRO-' + engine[-1]}" in p.stdout
    p = run_two_ranks([*args, "max_steps=4"])  # resumes from checkpoint-3 on both ranks
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "checkpoint-3" in p.stdout
    two = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert two == pytest.approx(one.losses, rel=1e-4, abs=1e-4)
    from qvl.data.registry import load_mixture
    from qvl.train.batches import Plan
    from qvl.train.loop import Dist

    # the precondition of the no-hang check: some step had images on one rank and only text on the other
    records = load_mixture(data, None, seed=0)
    cfg = build_config({**values, "max_steps": 4})
    media = [[bool(records[i].raw.get("image")) for i in Plan(16, cfg, Dist(r, 2, r)).epoch_order(0)[:4]]
             for r in range(2)]
    assert any(a != b for a, b in zip(*media))
    from qvl.models.load import load

    model, _ = load(out)
    assert sum(p.numel() for p in model.parameters()) > 0 and (out / "config.json").is_file()


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero2", marks=needs_ds), pytest.param("zero3", marks=needs_ds)])
def test_token_budget_rows_keep_two_ranks_in_step(engine, tiny_model_dir, tmp_path):
    """packed_row_tokens regroups each rank's samples: ranks may end with different row counts (here 1 row
    of 4 text samples + a fake image on one rank, text + image samples in 2 rows on the other). Every rank must still
    run as many forwards, with the same media, as the others: no hang, and the 1-rank losses."""
    from train_helpers import make_colour_data

    data = make_colour_data(tmp_path / "mixed", 8, text_only=8)  # images 33 tokens, texts 16, the fake image 17
    values = {"model_name_or_path": str(tiny_model_dir), "dataset_use": data, "tune_mm_vision": True,
              "tune_mm_mlp": True, "tune_mm_llm": True, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
              "data_flatten": True, "packed_row_tokens": 81, "save_strategy": "no", "report_to": "none",
              "balance_tokens": False,  # strided: the uneven split above (balanced, both ranks get one row)
              "seed": 0, "lr_scheduler_type": "constant", "max_pixels": 4096, "min_pixels": 4096,
              "max_steps": 2, **({"fsdp": "full_shard"} if engine == "fsdp" else {"deepspeed": ZERO[engine]})}
    one = train(build_config({**values, "gradient_accumulation_steps": 2, "output_dir": str(tmp_path / "one")}),
                log=lambda *_: None)
    out = tmp_path / "two"
    p = run_two_ranks([f"{k}={v}" for k, v in values.items()] + [f"output_dir={out}"], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    two = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert two == pytest.approx(one.losses, rel=1e-4, abs=1e-4)



def test_bf16_master_weights_reach_deepspeed_and_the_planner(make_cfg):
    """master_weights=bf16 under ZeRO turns on DeepSpeed's own bf16 master/state switches and halves the
    planned optimizer memory; the default leaves DeepSpeed's fp32 copies, and LoRA is never affected."""
    from qvl.train.preflight import plan_kwargs

    def ds(**kw):
        return deepspeed_config(make_cfg(deepspeed=ZERO["zero3"], bf16=True, **kw)).get("bf16", {})

    assert ds(master_weights="bf16") == {"enabled": True, "bf16_master_weights_and_grads": True,
                                         "bf16_optimizer_states": True}
    assert "bf16_master_weights_and_grads" not in ds()
    assert "bf16_master_weights_and_grads" not in ds(master_weights="bf16", lora_enable=True)
    from qvl.plan.memory import plan_train

    kw = plan_kwargs(make_cfg(deepspeed=ZERO["zero3"], bf16=True, master_weights="bf16"), world_size=2)
    assert kw["master_bf16"] and not plan_kwargs(make_cfg(deepspeed=ZERO["zero3"], bf16=True), world_size=2)["master_bf16"]
    def states(**kw):
        return plan_train("8B", gpu_mem=80, method="full", gpus=2, recommend=False, **kw).parts["optimizer states"]

    # ZeRO-2: (2 master + 2 grad partition + 2 x 2) vs (4 + 4 + 2 x 4) bytes per trained parameter;
    # ZeRO-3 without offload: the bf16 weight partition is the master, (2 + 2 x 2) of 16
    assert states(zero=2, master_bf16=True) == pytest.approx(states(zero=2) / 2)
    assert states(zero=3, master_bf16=True) == pytest.approx(states(zero=3) * 6 / 16)
    assert states(zero=3, master_bf16=True, offload=True) == 0.0  # on the CPU
    with pytest.raises(QvlError, match="ZeRO"):
        states(zero=0, master_bf16=True)
    recs = plan_train("8B", gpu_mem=80, method="full", zero=3, gpus=2, batch=2, seq_len=4096).recommendations
    rec = next(r for r in recs if r.changes == {"master_bf16": True})
    assert rec.fits
    from qvl.train.preflight import train_fix

    assert train_fix(rec, make_cfg(deepspeed=ZERO["zero3"], bf16=True)).startswith("master_weights=bf16 (→ ")


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero2", marks=needs_ds), pytest.param("zero3", marks=needs_ds)])
def test_bf16_master_weights_under_sharding_engines(engine, make_cfg, tmp_path, monkeypatch):
    """master_weights=bf16: the engine's master weights and AdamW states are bf16 (8 bytes per trained parameter),
    and training moves the weights; the default (fp32) keeps fp32 masters."""
    seen = {}
    real = D.prepare

    def spy(*a, **kw):
        seen["eng"] = real(*a, **kw)
        return seen["eng"]

    monkeypatch.setattr(D, "prepare", spy)
    key = {"fsdp": "full_shard"} if engine == "fsdp" else {"deepspeed": ZERO[engine]}
    for master, dtype in (("bf16", torch.bfloat16), ("auto", torch.float32)):
        lines = []
        r = train(make_cfg(output_dir=str(tmp_path / master), max_steps=2, save_strategy="no", bf16=True,
                           master_weights=master, **key), log=lines.append)
        assert len(r.losses) == 2 and all(torch.isfinite(torch.tensor(r.losses)))
        eng = seen["eng"]
        opt = eng.optimizer  # qvl's AdamW: DeepSpeed steps it over its master partitions
        if eng.name == "deepspeed":  # ZeRO-3 puts a partition in the groups only while it steps it
            zo = eng.runner.optimizer
            params = list(getattr(zo, "fp32_partitioned_groups_flat", None) or zo.single_partition_of_fp32_groups)
        else:
            params = [p for g in opt.param_groups for p in g["params"]]
        if eng.name == "ddp":  # ZeRO-2 on one process is plain training (engine_for_ranks), whose fp32 masters go
            assert engine == "zero2"  # back to the model's dtype for the servable save: the AdamW states tell
        else:
            assert params and {p.dtype for p in params} == {dtype}
        states = [v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
        assert states and {v.dtype for v in states} == {dtype}
        assert any("updates below bf16's resolution" in line or "smaller than bf16's resolution" in line
                   for line in lines) == (master == "bf16")


def test_deepspeed_bf16_keys_in_the_file_must_agree_with_master_weights(make_cfg, tmp_path):
    """qvl sets DeepSpeed's bf16 master switches from master_weights; a file that says otherwise is refused (CPU Adam
    and the preflight follow master_weights), one that agrees is kept, and the legacy "bfloat16" block is used."""
    def write(block_name, **keys):
        path = tmp_path / f"{block_name}_{len(keys)}_{sorted(keys.values())}.json"
        path.write_text(json.dumps({block_name: {"enabled": "auto", **keys}, "zero_optimization": {"stage": 2}}))
        return str(path)

    with pytest.raises(QvlError, match="master_weights"):
        deepspeed_config(make_cfg(deepspeed=write("bf16", bf16_master_weights_and_grads=True), bf16=True))
    with pytest.raises(QvlError, match="bf16_optimizer_states=False"):
        deepspeed_config(make_cfg(deepspeed=write("bf16", bf16_optimizer_states=False), bf16=True,
                                  master_weights="bf16"))
    agreed = deepspeed_config(make_cfg(deepspeed=write("bf16", bf16_master_weights_and_grads=True), bf16=True,
                                       master_weights="bf16"))
    assert agreed["bf16"]["bf16_optimizer_states"] is True
    legacy = deepspeed_config(make_cfg(deepspeed=write("bfloat16"), bf16=True, master_weights="bf16"))
    assert "bf16" not in legacy and legacy["bfloat16"]["bf16_master_weights_and_grads"] is True


def test_bf16_masters_never_touch_lora_adapters_or_plain_ddp(make_cfg):
    assert D.bf16_masters(make_cfg(fsdp="full_shard", bf16=True, master_weights="bf16"))
    lora = make_cfg(fsdp="full_shard", bf16=True, master_weights="bf16", lora_enable=True, tune_mm_llm=False)
    assert not D.bf16_masters(lora) and D.master_weights_fp32(lora)  # FSDP2 adapters stay fp32
    assert not D.bf16_masters(make_cfg(bf16=True, master_weights="bf16"))  # DDP: its own bf16 path


@needs_ds
def test_bf16_masters_with_offload_need_deepspeeds_cpu_adam(make_cfg, monkeypatch):
    """DeepSpeed takes only its CPU Adam (bf16 moments) for offloaded bf16 masters: when the op cannot be built the
    run stops with the ways out instead of DeepSpeed's assertion; without bf16 masters torch AdamW stands in."""
    import sys
    import types

    from qvl.models.load import load_model

    broken = types.ModuleType("deepspeed.ops.adam")
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", broken)  # no DeepSpeedCPUAdam: as if the build failed
    cfg = make_cfg(deepspeed=ZERO["zero3_offload"], bf16=True, master_weights="bf16")
    model = load_model(cfg.model_name_or_path)
    for p in model.parameters():
        p.requires_grad_(True)
    with pytest.raises(QvlError, match="CPU Adam"):
        D.build_optimizer(model, cfg, torch.device("cpu"), offload=True)
    notes = []
    opt = D.build_optimizer(model, make_cfg(deepspeed=ZERO["zero3_offload"], bf16=True), torch.device("cpu"),
                            offload=True, notes=notes)
    assert isinstance(opt, torch.optim.AdamW) and "CPU Adam could not be built" in notes[0]


def test_the_entry_points_end_the_process_group():
    """qvl.train's entry points destroy the group before the process exits: left to the interpreter's exit, gloo's
    threads can abort a finished rank (pytorch/pytorch#190489). A torchrun worker's finished run then ends the
    process at once, its output flushed, without the interpreter's finalization (a rank still aborted there after
    the group was destroyed); a caller's own process goes on. A one-process gloo group, in a process of its own (an
    in-process group from an earlier test stays: DeepSpeed caches it); none: nothing to do."""
    import subprocess
    import sys

    code = """
import atexit, os, torch, torch.distributed as td
from qvl.train.distributed import end_group, init_group, owns_process
end_group(True)  # no group: nothing happens
init_group(torch.device("cpu"))
end_group(False); assert not td.is_initialized()  # a failed run: no barrier, the group goes, the caller goes on
init_group(torch.device("cpu"))
end_group(True); assert not td.is_initialized()  # finished, in a caller's process: it goes on
assert not owns_process()  # not a torchrun worker
os.environ["TORCHELASTIC_RUN_ID"] = "test"
assert owns_process()
init_group(torch.device("cpu")); assert not owns_process()  # a group made before the run: the caller's
atexit.register(print, "finalized")
print("ok", end="")  # unflushed: end_group flushes it
end_group(True, exit_after=True)
print("after end_group")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    assert "after end_group" not in r.stdout and "finalized" not in r.stdout
