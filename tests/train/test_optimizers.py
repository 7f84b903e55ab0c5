"""``optim``: bitsandbytes' 8-bit AdamW (adamw_8bit / adamw_bnb_8bit / paged_adamw_8bit) next to torch AdamW, on the
tiny model on CPU: it trains and tracks AdamW, its 8-bit states are in the checkpoint and resume bit-identically; the
refusals come before anything loads; the planner counts what the run keeps and its advice maps back to keys."""

from __future__ import annotations

import pytest
import torch

from qvl.errors import QvlError
from qvl.train import checkpoint as ckpt
from qvl.train import optimizers
from qvl.train.loop import train

bnb = pytest.importorskip("bitsandbytes", reason="8-bit optimizers need bitsandbytes: pip install 'qvl[qlora]'")

FULL = dict(max_steps=5, learning_rate=1e-3, save_strategy="no")


def quiet(*_a, **_k):
    pass


def test_a_group_of_the_loop_steps_in_8_bits_and_tracks_adamw():
    """One parameter group as qvl builds them (name, LR, decay): uint8 states for a tensor of >= 4,096 elements, and
    five steps within 8-bit rounding of torch AdamW's."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 128)
    grads = [torch.randn(64, 128) for _ in range(5)]

    def run(optim):
        from qvl.train.config import TrainConfig

        p = torch.nn.Parameter(w0.clone())
        cfg = TrainConfig.model_construct(optim=optim, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999,
                                          adam_epsilon=1e-8, engine="ddp")
        opt = optimizers.build([{"params": [p], "lr": 1e-2, "weight_decay": 0.1, "name": "llm"}], cfg,
                               torch.device("cpu"))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt

    ref, plain = run("adamw_torch")
    got, eight = run("adamw_8bit")
    assert isinstance(plain, torch.optim.AdamW) and isinstance(eight, bnb.optim.AdamW8bit)
    assert eight.state[eight.param_groups[0]["params"][0]]["state1"].dtype == torch.uint8
    assert eight.param_groups[0]["name"] == "llm" and eight.param_groups[0]["weight_decay"] == 0.1
    moved = (ref - w0).abs().mean()
    assert (got - ref).abs().mean() < 0.05 * moved  # measured 0.8 % of the distance moved (CPU, bitsandbytes 0.50.2)


def test_full_fine_tuning_trains_with_8bit_states_in_the_checkpoint(make_cfg):
    plain = train(make_cfg(**FULL), log=quiet)
    lines: list[str] = []
    cfg = make_cfg(**{**FULL, "optim": "adamw_8bit", "save_strategy": "steps", "save_steps": 5})
    r = train(cfg, log=lambda m="", *a, **k: lines.append(str(m)))
    assert r.losses[0] == plain.losses[0]  # the same first step: the optimizer has not run yet
    assert r.losses[-1] < r.losses[0] - 0.5 and abs(r.losses[-1] - plain.losses[-1]) < 0.1 * plain.losses[0]
    state = torch.load(ckpt.latest_checkpoint(cfg.output_dir) / "optimizer.pt", weights_only=False)["state"]
    packed = [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]  # how bitsandbytes saves its states
    assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in packed)


def test_lora_with_8bit_states_resumes_identically(make_cfg):
    lora = dict(lora_enable=True, lora_r=8, lora_alpha=16, tune_mm_llm=False, tune_mm_mlp=True, max_steps=5,
                save_steps=2, learning_rate=1e-2, optim="paged_adamw_8bit")  # paged: plain 8-bit on a CPU
    whole = train(make_cfg(**lora, output_dir=str(make_cfg(**lora).output_dir) + "-whole"), log=quiet)
    cfg = make_cfg(**lora)

    def kill(step, row):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=quiet, callbacks=[kill])
    again = train(cfg, log=quiet)
    assert again.start_step == 2 and again.losses == whole.losses[2:]


def test_names_and_refusals(make_cfg, tmp_path, monkeypatch):
    import sys

    from qvl.models import load as load_mod

    assert make_cfg(optim="adamw_bnb_8bit").optim == "adamw_bnb_8bit"  # the Hugging Face Trainer's names
    with pytest.raises(QvlError, match="optimizer 'lion' is not supported") as e:
        make_cfg(optim="lion")
    assert "adamw_8bit" in e.value.fix

    def never(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(load_mod, "load_model", never)
    with pytest.raises(QvlError, match="optim=adamw_8bit runs on one GPU or under DDP, not under FSDP2"):
        train(make_cfg(optim="adamw_8bit", fsdp="full_shard"), log=quiet)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
        with pytest.raises(QvlError, match="optim=adamw_8bit needs bitsandbytes, which is not installed") as e:
            train(make_cfg(optim="adamw_8bit"), log=quiet)
        assert "qvl[qlora]" in e.value.fix and "adamw_torch" in e.value.fix


def test_planner_counts_8bit_states_and_bf16_adapters(make_cfg):
    from qvl.plan.memory import plan_train
    from qvl.train.preflight import plan_kwargs, train_fix

    kw = plan_kwargs(make_cfg(lora_enable=True, tune_mm_llm=False, optim="adamw_8bit", master_weights="bf16",
                              bf16=True))
    assert kw["optim"] == "adamw8bit" and kw["master_bf16"] is True
    assert plan_kwargs(make_cfg(lora_enable=True, tune_mm_llm=False, bf16=True))["master_bf16"] is False  # fp32
    lora = dict(method="qlora", lora_r=64, seq_len=2048, fused_ce=True, recommend=False, gpu="h200")
    fp32, small = plan_train("32B", **lora), plan_train("32B", **lora, optim="adamw8bit", master_bf16=True)
    assert small.parts["LoRA params"] == pytest.approx(fp32.parts["LoRA params"] / 2)
    assert small.parts["gradients"] == pytest.approx(fp32.parts["gradients"] / 2)
    assert small.parts["optimizer states"] == pytest.approx(fp32.parts["optimizer states"] / 4)  # 8 bytes -> 2
    assert "× 2 bytes (bf16)" in small.notes["LoRA params"] and "8-bit" in small.notes["optimizer states"]

    cfg = make_cfg(lora_enable=True, tune_mm_llm=False)
    rec = type("Rec", (), {"changes": {"optim": "adamw8bit", "master_bf16": True, "fused_ce": True},
                           "total_gib": 22.5})()
    assert train_fix(rec, cfg) == "optim=adamw_8bit master_weights=bf16 fused_cross_entropy=true (→ 22.5 GiB)"
    rec.changes = {"method": "qlora", "host_embeddings": True, "offload_activations": True,
                   "quantization_targets": "llm,merger,vision"}  # the combination the planner names for 32B
    assert train_fix(rec, cfg) == ("lora_enable=true tune_mm_llm=false quantization=nf4 host_embeddings=true "
                                   "activation_offloading=true quantization_targets=[llm,merger,vision] (→ 22.5 GiB)")


def test_planner_advises_8bit_states_for_a_lora_run_over_the_card():
    from qvl.plan.memory import plan_train

    plan = plan_train("32B", gpu="rtx5090", method="qlora", lora_r=64, seq_len=2048, fused_ce=True)
    assert not plan.fits
    advice = [r for r in plan.recommendations if r.fits]
    assert any(r.changes.get("optim") == "adamw8bit" or r.changes.get("master_bf16") for r in advice), \
        [r.text for r in plan.recommendations]


def test_bf16_adapters_with_master_weights_bf16(make_cfg):
    """master_weights: bf16 on one GPU keeps LoRA adapters (which peft makes fp32) in bf16, as the planner counts;
    the run trains and says what it costs."""
    from safetensors.torch import load_file

    lines: list[str] = []
    lora = dict(lora_enable=True, lora_r=8, lora_alpha=16, tune_mm_llm=False, tune_mm_mlp=False, bf16=True,
                max_steps=4, learning_rate=1e-2, save_strategy="no", optim="adamw_8bit")
    r = train(make_cfg(**lora, master_weights="bf16"), log=lambda m="", *a, **k: lines.append(str(m)))
    assert r.losses[-1] < r.losses[0]
    assert any(x.startswith("master_weights=bf16: LoRA adapters") for x in lines)
    saved = load_file(r.output_dir / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.bfloat16}
    fp32 = train(make_cfg(**lora, output_dir=str(r.output_dir) + "-fp32"), log=quiet)
    assert {t.dtype for t in load_file(fp32.output_dir / "adapter_model.safetensors").values()} == {torch.float32}


def test_resuming_with_another_optim_is_refused_with_the_fix(make_cfg):
    """A checkpoint's 8-bit states load into torch AdamW without complaint and the first step fails on a missing
    key (and the other way round): the resume says so instead."""
    from qvl.errors import QvlError

    lora = dict(lora_enable=True, lora_r=8, lora_alpha=16, tune_mm_llm=False, max_steps=2, save_steps=2)
    train(make_cfg(**lora, optim="adamw_8bit"), log=quiet)
    with pytest.raises(QvlError, match="optimizer states are bitsandbytes 8-bit AdamW's, this run's optimizer is "
                                       "torch AdamW") as e:
        train(make_cfg(**{**lora, "max_steps": 4}, optim="adamw_torch"), log=quiet)
    assert "resume=false" in e.value.fix
