"""``activation_offloading``: recomputed decoder layers keep their inputs in host memory (qvl.train.offload). On CPU the
"host" copies are plain clones, which checks the mechanics: what moves, that a compiled layer keeps one graph, the
same losses and gradients as the plain run; and ``auto`` turning the memory levers on only when the plan needs them."""

from __future__ import annotations

import pytest
import torch

from qvl.train import offload
from qvl.train.loop import train
from qvl.train.track import read_metrics


def quiet(*_a, **_k):
    pass


class Block(torch.nn.Module):
    """A decoder-like layer recomputed in backward, with its checkpoint inside (as qvl's compiled layers)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 96), torch.nn.Linear(96, 32)
        self.qvl_recompute = True

    def inner(self, x, scale):
        return x + self.down(torch.nn.functional.silu(self.up(x))) * scale

    def forward(self, x, scale):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, x, scale, use_reentrant=False)


@pytest.mark.parametrize("compiled", [False, True])
def test_only_layer_inputs_move_and_values_are_the_plain_ones(compiled):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(Block() for _ in range(3))
    if compiled:
        from torch import _dynamo
        from torch._dynamo.utils import counters

        _dynamo.reset()
        counters.clear()  # other tests' graphs
        for layer in layers:
            layer.compile(backend="aot_eager", dynamic=True)
    scale = torch.full((1, 1, 32), 0.5)  # smaller than a layer's input: stays

    def run(hooks):
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        h = x
        for layer in layers:
            with offload.around(layer, hooks, h):
                h = layer(h, scale)
        h.square().sum().backward()
        grads = [p.grad.clone() for p in layers.parameters()]
        layers.zero_grad()
        return h.detach(), x.grad, grads

    plain = run(None)
    hooks = offload.HostActivations(layers.parameters(), pin=False)
    moved = run(hooks)
    assert hooks.reset() == 3 * 2 * 9 * 32 * 4  # each layer's input, nothing else (weights, the scale)
    torch.testing.assert_close(moved[0], plain[0])
    torch.testing.assert_close(moved[1], plain[1])
    for a, b in zip(moved[2], plain[2], strict=True):
        torch.testing.assert_close(a, b)
    if compiled:
        assert counters["stats"]["unique_graphs"] == 1  # the hooks cost no recompile


def test_a_layer_that_keeps_its_activations_moves_nothing():
    layer = Block()
    layer.qvl_recompute = False
    hooks = offload.HostActivations(layer.parameters(), pin=False)
    x = torch.randn(1, 5, 32, requires_grad=True)
    with offload.around(layer, hooks, x):
        layer(x, torch.ones(1, 1, 32)).sum().backward()
    assert hooks.reset() == 0


def test_the_loop_with_offloading_trains_like_plain(make_cfg, tmp_path, monkeypatch):
    moves = []
    pack = offload.HostActivations.pack

    def counted(self, t):
        out = pack(self, t)
        moves.append(out is not t)
        return out

    monkeypatch.setattr(offload.HostActivations, "pack", counted)
    kw = dict(data_flatten=True, tune_mm_llm=False, lora_enable=True, lora_r=8, lora_alpha=16, max_steps=3,
              save_strategy="no", gradient_checkpointing=True, packed_attention="per_sample")
    plain = train(make_cfg(output_dir=str(tmp_path / "plain"), activation_offloading=False, **kw), log=quiet)
    said: list[str] = []
    moved = train(make_cfg(output_dir=str(tmp_path / "moved"), activation_offloading=True, **kw),
                  log=lambda m="", *a, **k: said.append(str(m)))
    assert any(x.startswith("activation_offloading: recomputed decoder layers") for x in said)
    assert sum(moves) >= 3 * 2  # every step, each of the tiny model's layers: its input went to the host
    assert moved.losses == pytest.approx(plain.losses, rel=1e-5)
    ga = [r["grad_norm"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    gb = [r["grad_norm"] for r in read_metrics(tmp_path / "moved" / "metrics.jsonl")]
    assert gb == pytest.approx(ga, rel=1e-5)


def test_refusals(make_cfg):
    from qvl.errors import QvlError

    with pytest.raises(QvlError, match="activation_offloading: it moves what recomputed layers keep, and "
                                       "gradient_checkpointing is off"):
        train(make_cfg(activation_offloading=True, gradient_checkpointing=False, lora_enable=True,
                       tune_mm_llm=False, max_steps=1, packed_attention="per_sample"), log=quiet)
    with pytest.raises(QvlError, match="activation_offloading: it needs packed rows"):
        train(make_cfg(activation_offloading=True, gradient_checkpointing=True, data_flatten=False,
                       lora_enable=True, tune_mm_llm=False, max_steps=1), log=quiet)


def test_auto_turns_levers_on_only_when_the_plan_needs_them(make_cfg, monkeypatch):
    """auto: off when the run fits; host_embeddings first, then activation offloading, each only when needed."""
    from qvl.train import preflight

    fits_when = {}

    def fake_fits(cfg, *a, **k):
        return fits_when(cfg)

    monkeypatch.setattr(preflight, "plan_fits", fake_fits)
    cfg = make_cfg(lora_enable=True, tune_mm_llm=False, gradient_checkpointing=True)
    assert cfg.host_embeddings == "auto" and cfg.activation_offloading == "auto"

    fits_when = lambda c: True  # noqa: E731
    got, line = preflight.auto_levers(cfg)
    assert (got.host_embeddings, got.activation_offloading, line) == (False, False, None)

    fits_when = lambda c: c.host_embeddings is True  # noqa: E731
    got, line = preflight.auto_levers(cfg)
    assert (got.host_embeddings, got.activation_offloading) == (True, False)
    assert line.startswith("host_embeddings=true (auto)")

    fits_when = lambda c: c.host_embeddings is True and c.activation_offloading is True  # noqa: E731
    got, line = preflight.auto_levers(cfg)
    assert (got.host_embeddings, got.activation_offloading) == (True, True)
    assert line.startswith("host_embeddings=true and activation_offloading=true (auto)")

    fits_when = lambda c: False  # noqa: E731  nothing helps: both off, the preflight reports
    got, line = preflight.auto_levers(cfg)
    assert (got.host_embeddings, got.activation_offloading, line) == (False, False, None)

    got, _ = preflight.auto_levers(make_cfg(host_embeddings=True, activation_offloading=False))
    assert (got.host_embeddings, got.activation_offloading) == (True, False)  # what the user set stays
    got, _ = preflight.auto_levers(cfg, world_size=2)
    assert (got.host_embeddings, got.activation_offloading) == (False, False)  # several processes: off
    # 4B ties its embedding table to the LM head: it cannot move, so auto never picks it there
    fits_when = lambda c: c.activation_offloading is True  # noqa: E731
    tied = make_cfg(model_name_or_path="Qwen/Qwen3-VL-4B-Instruct", lora_enable=True, tune_mm_llm=False,
                    gradient_checkpointing=True)
    got, line = preflight.auto_levers(tied)
    assert (got.host_embeddings, got.activation_offloading) == (False, True)
    assert line.startswith("activation_offloading=true (auto)")


def test_planner_counts_host_levers():
    from qvl.plan.memory import plan_train

    kw = dict(method="qlora", lora_r=64, seq_len=2048, fused_ce=True, recommend=False, gpu="rtx4090",
              optim="adamw8bit", master_bf16=True)
    base = plan_train("32B", **kw)
    host = plan_train("32B", **kw, host_embeddings=True)
    both = plan_train("32B", **kw, host_embeddings=True, offload_activations=True)
    assert base.parts["weights"] - host.parts["weights"] == pytest.approx(151_936 * 5_120 * 2 / 2**30, rel=1e-3)
    assert base.parts["LLM activations"] - both.parts["LLM activations"] == pytest.approx(
        62 * 2_048 * 2 * 5_120 / 2**30, rel=1e-3)  # 64 layer inputs, 2 left on the GPU
    assert both.cpu_ram_gib == pytest.approx((151_936 * 5_120 * 2 + 62 * 2_048 * 2 * 5_120) / 2**30, rel=1e-2)
    all_levers = plan_train("32B", **kw, host_embeddings=True, offload_activations=True,
                            quantization_targets=("llm", "vision", "merger"))
    assert all_levers.fits and not both.fits  # r64, 2k rows on a 24 GB card: every lever, the tower in NF4 too
    tied = plan_train("4B", gpu="rtx4090", host_embeddings=True, recommend=False)
    assert tied.settings["host_embeddings"] is False  # 4B ties its table to the LM head: it stays


def test_the_loop_turns_on_what_auto_chose(make_cfg, tmp_path, monkeypatch):
    """The levers auto picks reach the run; where the run cannot take them (sdpa instead of per_sample attention)
    auto does not pick them, and asking for one there is refused before the model loads."""
    from qvl.errors import QvlError
    from qvl.models import load as load_mod
    from qvl.train import preflight

    monkeypatch.setattr(preflight, "plan_fits", lambda c, *a, **k: c.host_embeddings is True
                        and c.activation_offloading is True)
    kw = dict(lora_enable=True, tune_mm_llm=False, gradient_checkpointing=True, max_steps=1, save_strategy="no")
    said: list[str] = []
    r = train(make_cfg(output_dir=str(tmp_path / "per_sample"), packed_attention="per_sample", **kw),
              log=lambda m="", *a, **k: said.append(str(m)))
    assert r.steps == 1
    assert "host_embeddings=true and activation_offloading=true (auto): without, the memory plan does not fit " \
           "this run on the card" in said
    assert any(x.startswith("host_embeddings: the input-embedding table") for x in said)
    assert any(x.startswith("activation_offloading: recomputed decoder layers") for x in said)

    said.clear()
    train(make_cfg(output_dir=str(tmp_path / "sdpa"), packed_attention="sdpa", **kw),
          log=lambda m="", *a, **k: said.append(str(m)))
    assert not any("(auto)" in x or x.startswith(("host_embeddings", "activation_offloading")) for x in said)

    def never(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(load_mod, "load_model", never)
    with pytest.raises(QvlError, match="activation_offloading: it needs packed rows with per_sample attention") as e:
        train(make_cfg(packed_attention="sdpa", activation_offloading=True, **kw), log=quiet)
    assert "packed_attention: per_sample" in e.value.fix




def test_the_shipped_24gb_qlora_run_with_its_host_levers_trains_like_without(tiny_model_dir, colour_data, tmp_path):
    """examples/qlora_32b_24gb.yaml as shipped (NF4 LLM, tower and mergers, bf16 adapters, 8-bit AdamW) on the tiny
    model: with the two host-memory levers the preflight turns on for a 24 GB card, the losses of the run without."""
    pytest.importorskip("bitsandbytes")
    from pathlib import Path

    from qvl.train.config import load_config

    example = Path(__file__).resolve().parents[2] / "examples" / "qlora_32b_24gb.yaml"

    def run(name, on):
        cfg = load_config(example, {"model_name_or_path": str(tiny_model_dir), "dataset_use": colour_data,
                                    "dataset_registry": None, "output_dir": str(tmp_path / name), "max_steps": 3,
                                    "save_strategy": "no", "report_to": "none", "max_pixels": 4096,
                                    "min_pixels": 4096, "packed_attention": "per_sample",
                                    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                    "host_embeddings": on, "activation_offloading": on})
        return train(cfg, log=quiet).losses

    assert run("with", True) == pytest.approx(run("without", False), rel=1e-5)
