"""Component control: requires_grad and optimizer groups for every parameter, LoRA settings, vision participation."""

from __future__ import annotations

import itertools

import pytest
import torch

from qvl.train import components as C
from qvl.train.config import build_config


def cfg_of(**kw):
    return build_config(dict(model_name_or_path="m", dataset_use="d", **kw))


def fresh(tied: bool = False):
    from qvl.models.build import tiny_parts

    model, _ = tiny_parts()
    if tied:
        from transformers import Qwen3VLForConditionalGeneration

        config = model.config
        config.tie_word_embeddings = True
        config.text_config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(config)
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return model


EXPECTED = {"vision": "tune_mm_vision", "deepstack": "tune_mm_vision", "merger": "tune_mm_mlp",
            "llm": "tune_mm_llm", "lm_head": "tune_mm_llm"}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("flags", [f for f in itertools.product([False, True], repeat=3) if any(f)])
def test_flags_set_requires_grad_on_every_parameter(flags, tied):
    vision, mlp, llm = flags
    cfg = cfg_of(tune_mm_vision=vision, tune_mm_mlp=mlp, tune_mm_llm=llm, learning_rate=1e-5,
                 **({"vision_tower_lr": 2e-6} if vision else {}), **({"mm_projector_lr": 3e-4} if mlp else {}))
    model = C.apply_training_mode(fresh(tied), cfg)
    flag = {"tune_mm_vision": vision, "tune_mm_mlp": mlp, "tune_mm_llm": llm}
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p.requires_grad == flag[EXPECTED[C.component_of(name)]], name
    # lm_head follows tune_mm_llm (the official code sets a module attribute and misses untied heads)
    assert model.lm_head.weight.requires_grad == llm
    assert model.config.use_cache is False
    # optimizer groups: every trainable parameter exactly once, with its component's LR
    groups = C.param_groups(model, cfg)
    seen = {}
    for g in groups:
        for n, p in zip(g.names, g.params):
            assert id(p) not in seen, n
            seen[id(p)] = g.lr
            assert g.lr == {"vision": cfg.lr_for("vision"), "deepstack": cfg.lr_for("vision"),
                            "merger": cfg.lr_for("merger"), "llm": 1e-5, "lm_head": 1e-5}[C.component_of(n)]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable
    if vision:
        assert cfg.lr_for("vision") == 2e-6
    if mlp:
        assert cfg.lr_for("merger") == 3e-4


def test_vision_covers_deepstack_mergers_and_mlp_only_the_merger():
    model = C.apply_training_mode(fresh(), cfg_of(tune_mm_mlp=True))
    assert all(p.requires_grad for p in model.model.visual.merger.parameters())
    assert not any(p.requires_grad for p in model.model.visual.deepstack_merger_list.parameters())
    model = C.apply_training_mode(fresh(), cfg_of(tune_mm_vision=True))
    assert all(p.requires_grad for p in model.model.visual.deepstack_merger_list.parameters())
    assert all(p.requires_grad for p in model.model.visual.blocks.parameters())
    assert not any(p.requires_grad for p in model.model.visual.merger.parameters())


def test_weight_decay_groups_split():
    cfg = cfg_of(tune_mm_llm=True, weight_decay=0.1)
    model = C.apply_training_mode(fresh(), cfg)
    groups = C.optimizer_groups(C.param_groups(model, cfg), 0.1)
    for g in groups:
        for p in g["params"]:
            assert (g["weight_decay"] == 0.0) == (p.ndim < 2)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_exact_settings_and_default_targets(dropout):
    cfg = cfg_of(lora_enable=True, lora_r=4, lora_alpha=12, lora_dropout=dropout)
    model = C.apply_training_mode(fresh(), cfg)
    lora_modules = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    names = {C.base_name(n) for n in lora_modules}
    expected = {f"model.language_model.layers.{i}.{k}" for i in range(2) for k in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names == expected  # all LLM linear layers, nothing in vision, not lm_head
    for m in lora_modules.values():
        assert m.r["default"] == 4 and m.scaling["default"] == 12 / 4
        drop = m.lora_dropout["default"]
        if dropout == 0:
            assert isinstance(drop, torch.nn.Identity)  # 0 means 0 (official code turns it into 0.05)
        else:
            assert drop.p == dropout
    for name, p in model.named_parameters():
        assert p.requires_grad == C.is_lora(name), name


def test_lora_vision_and_merger_targets():
    cfg = cfg_of(lora_enable=True, lora_r=2, lora_alpha=4, lora_targets="vision,merger")
    model = C.apply_training_mode(fresh(), cfg)
    comps = {C.component_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert comps == {"vision", "merger"}


def test_lora_plus_full_merger_saves_every_trained_weight(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = cfg_of(lora_enable=True, lora_r=4, lora_alpha=8, tune_mm_mlp=True, tune_mm_vision=True,
                 mm_projector_lr=1e-3, vision_tower_lr=1e-4)
    model = C.apply_training_mode(fresh(), cfg)
    rows = {r["component"]: r for r in C.component_table(model, cfg)}
    assert rows["merger"]["how"] == "full" and rows["merger"]["lr"] == 1e-3
    assert rows["vision"]["how"] == "full" and rows["vision"]["lr"] == 1e-4
    assert rows["deepstack"]["how"] == "full" and rows["llm"]["how"] == "LoRA" and rows["lm_head"]["how"] == "frozen"
    with torch.no_grad():  # change every trained weight so a missing one shows up
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    trained = {C.base_name(n) for n, p in model.named_parameters() if p.requires_grad}
    saved_names = {C.base_name(k.replace(".weight", ".default.weight").replace(".bias", ".default.bias"))
                   if ".lora_" in k else C.base_name(k) for k in saved}
    assert {t.replace(".default", "") for t in trained} <= {s.replace(".default", "") for s in saved_names} | trained
    assert any("merger" in k and "deepstack" not in k for k in saved)
    assert any("deepstack_merger_list" in k for k in saved) and any("blocks.0.attn" in k for k in saved)
    # reload: identical logits
    ids = torch.tensor([[1, 2, 3, 4]])
    model.eval()
    ref = model(input_ids=ids).logits
    again = PeftModel.from_pretrained(fresh(), str(tmp_path)).eval()
    assert torch.allclose(again(input_ids=ids).logits, ref, atol=1e-6)


def test_text_only_batch_gives_vision_zero_grads(tiny_processor):
    from qvl.data.collate import collate
    from qvl.data.preprocess import encode
    from qvl.data.samples import parse_sample
    from qvl.models.tokens import token_ids
    from qvl.train.loss_module import LossModule

    cfg = cfg_of(tune_mm_vision=True, tune_mm_mlp=True, tune_mm_llm=True)
    model = C.apply_training_mode(fresh(), cfg).train()
    sample, _ = parse_sample({"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    batch = collate([encode(sample, tiny_processor)], token_ids(tiny_processor.tokenizer).pad)
    assert "pixel_values" not in batch
    n = float((batch["labels"] != -100).sum())
    loss, _ = LossModule(model)(batch, n)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # every trainable weight joins the backward (DDP / ZeRO never hang)
        if C.component_of(name) in ("vision", "deepstack", "merger"):
            assert torch.count_nonzero(p.grad) == 0, name


def test_gradient_checkpointing_with_lora(tiny_processor):
    from qvl.data.collate import collate
    from qvl.data.preprocess import encode
    from qvl.data.samples import parse_sample
    from qvl.models.tokens import token_ids
    from qvl.train.loss_module import LossModule

    cfg = cfg_of(lora_enable=True, lora_r=4, lora_alpha=8, gradient_checkpointing=True)
    model = C.apply_training_mode(fresh(), cfg)
    C.enable_gradient_checkpointing(model)
    model.train()
    sample, _ = parse_sample({"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    batch = collate([encode(sample, tiny_processor)], token_ids(tiny_processor.tokenizer).pad)
    with torch.no_grad():  # lora_B starts at zero: make A's gradient visible
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    loss, _ = LossModule(model)(batch, 1.0)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.get_base_model().is_gradient_checkpointing


def test_table_renders():
    cfg = cfg_of(tune_mm_llm=True, tune_mm_mlp=True, mm_projector_lr=1e-4)
    model = C.apply_training_mode(fresh(), cfg)
    text = C.render_table(C.component_table(model, cfg))
    assert "merger" in text and "1.00e-04" in text and "frozen" in text


@pytest.mark.parametrize("targets", ["llm", "vision", "merger", "llm,vision,merger"])
def test_planned_lora_params_are_the_adapters_made(targets, tmp_path):
    """The memory planner's LoRA count (qvl.plan.memory.lora_params, on what the preflight passes it) equals the
    trainable parameters LoRA adds for each ``lora_targets``: vision-only LoRA plans no LLM adapters."""
    from qvl.plan.memory import lora_params, parse_lora_targets
    from qvl.plan.model import from_config
    from qvl.train.preflight import _lora_targets

    cfg = cfg_of(lora_enable=True, lora_r=4, lora_alpha=8, lora_targets=targets)
    model = C.apply_training_mode(fresh(), cfg)
    model.config.save_pretrained(tmp_path)
    made = sum(p.numel() for p in model.parameters() if p.requires_grad)
    planned = parse_lora_targets(_lora_targets(cfg))
    assert ("q" in planned) == ("llm" in targets) and ("vision" in planned) == ("vision" in targets)
    assert lora_params(from_config(tmp_path), 4, planned) == made
