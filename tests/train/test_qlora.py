"""QLoRA (``quantization: nf4 | int8``) on the tiny model, on CPU: it trains, resumes bit-identically, its first loss
is the bf16 LoRA run's within NF4's rounding, the adapter merges into the 16-bit base and serves; the config's
alias and each refusal. bitsandbytes' CPU backend (>= 0.50: 4-bit forward and backward) runs every test here."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qvl.errors import QvlError
from qvl.train import checkpoint as ckpt
from qvl.train.loop import train

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'qvl[qlora]'")

# NF4 rounds each weight to one of 16 levels of its 64-weight block's absmax: on the tiny model the first step's loss
# moved 0.2 % (6.4443 against 6.4300, bf16 LoRA); 2 % leaves room for other seeds and torch builds
FIRST_LOSS_REL_TOL = 0.02

QLORA = dict(lora_enable=True, lora_r=8, lora_alpha=16, tune_mm_llm=False, tune_mm_mlp=False, bf16=True,
             gradient_checkpointing=True, learning_rate=1e-2, max_steps=5, save_steps=2, quantization="nf4")


def quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def runs(tiny_model_dir, colour_data, tmp_path_factory):
    """One NF4 LoRA run (5 steps, checkpoints at 2 and 4) with its start-up lines, and the same run's first step
    with bf16 weights."""
    from qvl.train.config import build_config

    base = tmp_path_factory.mktemp("qlora")

    def cfg(name, **kw):
        values = dict(model_name_or_path=str(tiny_model_dir), dataset_use=colour_data, output_dir=str(base / name),
                      per_device_train_batch_size=4, report_to="none", seed=0, lr_scheduler_type="constant",
                      max_pixels=64 * 64, min_pixels=64 * 64, **{**QLORA, **kw})
        return build_config(values)

    lines: list[str] = []
    nf4 = train(cfg("nf4"), log=lambda msg="", *a, **k: lines.append(str(msg)))
    bf16 = train(cfg("bf16", quantization=None, max_steps=1, save_strategy="no"), log=quiet)
    return {"nf4": nf4, "bf16": bf16, "lines": lines, "cfg": cfg, "base": base}


def test_nf4_lora_trains_and_says_what_is_quantised(runs):
    r, lines = runs["nf4"], runs["lines"]
    assert r.steps == 5 and r.losses[-1] < r.losses[0] - 0.5  # measured 6.44 -> 5.60
    line = next(x for x in lines if x.startswith("quantization=nf4"))
    assert "NF4 with double quantisation" in line and "llm 14 linears" in line
    assert "vision, merger, embeddings, lm_head, norms stay bfloat16" in line
    table = next(x for x in lines if x.startswith("component"))
    assert "LoRA+nf4" in table and "vision      frozen " in table
    # the adapter folder: LoRA weights only, in the trained dtype, naming the 16-bit base
    out = r.output_dir
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] and json.loads((out / "qvl_train.json").read_text())["config"][
        "quantization"] == "nf4"


def test_modules_are_4bit_under_lora_and_vision_stays_16bit(tiny_model_dir, make_cfg):
    from qvl.models.load import load_model
    from qvl.train import components as C
    from qvl.train.quantize import quantize_model

    cfg = make_cfg(**{**QLORA, "quantization_targets": ["llm"]})
    model = load_model(tiny_model_dir, dtype=torch.bfloat16)
    done = quantize_model(model, cfg, torch.device("cpu"), torch.bfloat16)
    model = C.apply_training_mode(model, cfg)
    q = model.get_submodule("base_model.model.model.language_model.layers.0.self_attn.q_proj")
    assert type(q).__module__.startswith("peft.tuners.lora.bnb")  # peft's bitsandbytes LoRA layer
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.base_layer.weight.quant_state.nested  # double quant
    assert type(model.get_submodule("base_model.model.model.visual.blocks.0.attn.qkv")) is torch.nn.Linear
    assert type(model.get_submodule("base_model.model.lm_head")) is torch.nn.Linear
    assert done.layers == {"llm": 14}
    frozen = {r["component"]: r["frozen"] for r in C.component_table(model, cfg)}
    plain = {r["component"]: r["frozen"] for r in C.component_table(
        C.apply_training_mode(load_model(tiny_model_dir, dtype=torch.bfloat16), cfg), cfg)}
    assert frozen == plain  # quantised weights counted unpacked


def test_first_step_loss_matches_bf16_lora(runs):
    a, b = runs["nf4"].losses[0], runs["bf16"].losses[0]
    assert a != b and abs(a - b) / b < FIRST_LOSS_REL_TOL


def test_resume_gives_identical_losses(runs):
    cfg = runs["cfg"]("killed")

    def kill(step, row):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=quiet, callbacks=[kill])
    assert ckpt.latest_checkpoint(cfg.output_dir).name == "checkpoint-2"
    again = train(cfg, log=quiet)
    assert again.start_step == 2
    assert again.losses == runs["nf4"].losses[2:]  # bit-identical after the checkpoint


def test_merge_into_16bit_base_and_serve(runs, tiny_model_dir, tmp_path):
    """`qvl merge` puts the adapter into the base's own weights (reloaded from its folder, never the dequantised 4-bit
    ones); the merged folder and base + adapter give the same greedy answer. The served model is the 16-bit base +
    adapter, so its logits differ from what training saw (4-bit base + adapter) by NF4's rounding only."""
    from qvl.cli.main import app
    from qvl.data.samples import Message
    from qvl.infer.merge import _logits, probe_inputs
    from qvl.infer.transformers_backend import TransformersEngine
    from qvl.infer.types import Request
    from qvl.models.load import load, load_model
    from qvl.train.quantize import quantize_model

    adapter, merged = runs["nf4"].output_dir, tmp_path / "merged"
    r = CliRunner().invoke(app, ["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--out",
                                 str(merged), "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert "trained on nf4 base weights" in r.output and "verified" in r.output
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "bfloat16"

    e1 = TransformersEngine.load(str(merged), max_batch_size=1, dtype="bfloat16")
    e2 = TransformersEngine.load(str(tiny_model_dir), adapter=str(adapter), max_batch_size=1, dtype="bfloat16")
    req = lambda e: Request([Message("user", ["What color is red?"])], e.sampling(temperature=0, max_new_tokens=6))  # noqa: E731
    a, b = e1.generate(req(e1)), e2.generate(req(e2))
    assert a.text == b.text and a.completion_tokens >= 1
    e1.close()
    e2.close()

    # what training computed (4-bit base + adapter) against what is served (16-bit base + adapter)
    served, processor = load(merged, dtype=torch.bfloat16)
    inputs = probe_inputs(processor)
    trained = load_model(tiny_model_dir, dtype=torch.bfloat16)
    quantize_model(trained, runs["cfg"]("x"), torch.device("cpu"), torch.bfloat16)
    from peft import PeftModel

    trained = PeftModel.from_pretrained(trained, str(adapter)).eval()
    ref, got = _logits(trained, inputs), _logits(served, inputs)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()  # NF4's rounding, not another model


def test_adapter_folder_serves_on_the_16bit_base(runs):
    from qvl.models.load import load_model

    model = load_model(runs["nf4"].output_dir)  # what `qvl serve RUN_DIR` loads: base from adapter_config.json
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def test_compiled_4bit_lora_layer_matches_eager():
    """compile_layers over quantised layers: dynamo traces a LoRA-wrapped NF4 linear whole (fullgraph: no break at
    bitsandbytes' ops) and AOT autograd's forward and backward give eager's values (the whole tiny model compiled
    with inductor, compile_layers=true, gave losses within 1e-4 of eager's over 3 steps: too slow to run here)."""
    from peft import LoraConfig, get_peft_model

    from qvl.train.quantize import _quantized_linear

    torch.manual_seed(0)
    outer = torch.nn.Sequential()
    outer.add_module("proj", _quantized_linear(bnb, "nf4", torch.nn.Linear(64, 96), torch.bfloat16).to("cpu"))
    outer.is_loaded_in_4bit = True
    model = get_peft_model(outer, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)

    def run(fn):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.float().square().sum().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    torch._dynamo.reset()
    eager_out, eager_grads = run(model)
    out, grads = run(torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True))
    torch.testing.assert_close(out, eager_out, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_int8_trains(make_cfg):
    r = train(make_cfg(**{**QLORA, "quantization": "int8", "max_steps": 2, "save_strategy": "no"}), log=quiet)
    assert r.steps == 2 and all(torch.isfinite(torch.tensor(r.losses)))


def test_quantization_bit_alias_and_refusals(make_cfg, tmp_path):
    lora = {k: v for k, v in QLORA.items() if k != "quantization"}
    assert make_cfg(**lora, quantization_bit=4).quantization == "nf4"  # LLaMA-Factory's key
    assert make_cfg(**lora, quantization_bit=8).quantization == "int8"
    with pytest.raises(QvlError, match="both set"):
        make_cfg(**QLORA, quantization_bit=4)
    with pytest.raises(QvlError, match="use 4 \\(nf4\\) or 8"):
        make_cfg(**lora, quantization_bit=3)
    # full fine-tuning of a quantised part
    with pytest.raises(QvlError, match="tune_mm_llm=true fully fine-tunes the llm") as e:
        make_cfg(quantization="nf4", lora_enable=False, tune_mm_llm=True)
    assert "lora_enable: true" in e.value.fix
    with pytest.raises(QvlError, match="tune_mm_mlp=true fully fine-tunes the merger"):
        make_cfg(**{**QLORA, "quantization_targets": ["llm", "merger"], "tune_mm_mlp": True})
    make_cfg(**{**QLORA, "tune_mm_mlp": True})  # the merger in bf16 trains fully next to a 4-bit LLM
    # ZeRO-3 and FSDP2, before anything loads
    zero3 = tmp_path / "zero3.json"  # (ZeRO-2 on one process runs without DeepSpeed: nothing to refuse)
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    with pytest.raises(QvlError, match="ZeRO-3 cannot shard") as e:
        train(make_cfg(**QLORA, deepspeed=str(zero3)), log=quiet)
    assert "one GPU or DDP" in e.value.fix
    with pytest.raises(QvlError, match="FSDP2 cannot shard"):
        train(make_cfg(**QLORA, fsdp="full_shard"), log=quiet)


def test_no_bitsandbytes_is_refused_before_the_model_loads(make_cfg, monkeypatch):
    import sys

    from qvl.models import load as load_mod

    def never(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(load_mod, "load_model", never)
    with pytest.raises(QvlError, match="needs bitsandbytes"):
        train(make_cfg(**QLORA), log=quiet)


def test_refusals_without_bitsandbytes_or_its_cpu_backend(monkeypatch):
    import sys

    from qvl.train.quantize import require_bitsandbytes

    cpu = torch.device("cpu")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
        with pytest.raises(QvlError, match="needs bitsandbytes, which is not installed") as e:
            require_bitsandbytes("nf4", cpu, torch.bfloat16)
        assert "qvl[qlora]" in e.value.fix

    def no_backend(*a, **k):
        raise NotImplementedError("no kernel for cpu")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", no_backend)
    with pytest.raises(QvlError, match="cannot run a nf4 layer on CPU") as e:
        require_bitsandbytes("nf4", cpu, torch.bfloat16)
    assert "pip install -U bitsandbytes" in e.value.fix


def test_planner_counts_4bit_weights():
    from qvl.cli.main import app
    from qvl.plan.memory import plan_train
    from qvl.train.config import build_config
    from qvl.train.preflight import plan_kwargs

    r = CliRunner().invoke(app, ["plan", "train", "32B", "--quantization", "nf4", "--gpu", "rtx5090", "--json"])
    plan = json.loads(r.output)
    bf16 = plan_train("32B", "rtx5090", method="lora")
    assert plan["settings"]["quantization"] == "nf4" and "NF4" in plan["notes"]["weights"]
    # 31.2 B LLM linears at 4.127 bits instead of 16: 58 GiB less
    assert bf16.parts["weights"] - plan["parts"]["weights"] == pytest.approx(31.2e9 * (2 - 4.127 / 8) / 2**30,
                                                                                rel=0.01)
    int8 = plan_train("32B", "rtx5090", method="lora", quantization="int8")
    assert plan["parts"]["weights"] < int8.parts["weights"] < bf16.parts["weights"]
    with pytest.raises(QvlError, match="full fine-tuning cannot update quantised weights"):
        plan_train("8B", "rtx5090", method="full", quantization="nf4")
    cfg = build_config(dict(model_name_or_path="Qwen/Qwen3-VL-32B-Instruct", dataset_use="x", **QLORA))
    assert plan_kwargs(cfg)["quantization"] == "nf4"


def test_planner_counts_quantised_vision_and_merger_when_named():
    from qvl.plan.memory import plan_train
    from qvl.plan.model import resolve_model
    from qvl.train.config import build_config
    from qvl.train.preflight import plan_kwargs

    m = resolve_model("32B")
    llm = plan_train("32B", "rtx5090", method="qlora")
    both = plan_train("32B", "rtx5090", method="qlora", quantization_targets=("llm", "vision", "merger"))
    saved = m.params_vision * (2 - 4.127 / 8) / 2**30  # the tower and the merger, 4.127 bits instead of 16
    assert llm.parts["weights"] - both.parts["weights"] == pytest.approx(saved, rel=0.02)
    assert "vision, merger bf16" in llm.notes["weights"] and "+ vision + merger" in both.notes["weights"]
    with pytest.raises(QvlError, match="unknown quantization targets"):
        plan_train("32B", "rtx5090", method="qlora", quantization_targets=("vision",))
    cfg = build_config(dict(model_name_or_path="Qwen/Qwen3-VL-32B-Instruct", dataset_use="x", **QLORA,
                            quantization_targets=["llm", "vision"]))
    assert plan_kwargs(cfg)["quantization_targets"] == ("llm", "vision")


def test_vision_target_takes_the_deepstack_mergers_too(tiny_model_dir, make_cfg):
    """quantization_targets: vision quantises the tower's blocks and the DeepStack mergers (their component follows
    the tower), merger the patch merger: what the planner counts for each."""
    from qvl.models.load import load_model
    from qvl.train.quantize import quantize_model

    model = load_model(tiny_model_dir, dtype=torch.bfloat16)
    cfg = make_cfg(**{**QLORA, "quantization_targets": ["llm", "vision", "merger"]})
    done = quantize_model(model, cfg, torch.device("cpu"), torch.bfloat16)
    deepstack = len(model.model.visual.deepstack_merger_list)
    assert deepstack and done.layers["deepstack"] == 2 * deepstack and done.layers["merger"] == 2
    assert isinstance(model.model.visual.deepstack_merger_list[0].linear_fc1, bnb.nn.Linear4bit)


def test_training_the_deepstack_mergers_of_a_quantised_tower_is_refused(make_cfg):
    lora = {**QLORA, "quantization_targets": ["llm", "vision"], "lora_targets": ["llm", "vision"]}
    with pytest.raises(QvlError, match="fully trains the DeepStack mergers") as e:
        make_cfg(**lora, tune_mm_vision=True)
    assert "tune_mm_vision: false" in e.value.fix
    make_cfg(**lora, tune_mm_vision=False)  # vision LoRA on a quantised tower


def test_quantising_without_the_llm_is_refused(make_cfg):
    with pytest.raises(QvlError, match="leaves the LLM in 16 bits") as e:
        make_cfg(**{**QLORA, "quantization_targets": ["vision"]})
    assert "add llm" in e.value.fix
