"""Speed levers (src/qvl/train/: loss_head, recompute, compile, graphs, host; components, distributed) compute
what the plain path computes.

Each lever against the plain path on CPU (tiny model, fp32): losses rel 1e-5, gradients max |diff| /
max |grad| < 1e-4 per parameter, unless said otherwise. Liger / flex / fused CUDA kernels are GPU-only
and measured by bench/train_throughput.py instead.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from qvl.errors import QvlError
from qvl.train import batches, compile, components, distributed, host, loop, loss_head, optimizers, recompute
from qvl.train.loop import train
from qvl.train.track import read_metrics

quiet = {"log": lambda *_: None}


def _worst(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max((a[n] - b[n]).abs().max().item() / (b[n].abs().max().item() + 1e-12) for n in a)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- fused linear + cross-entropy

@pytest.mark.parametrize("chunk", [5, 64])
def test_linear_cross_entropy_equals_plain(chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(h @ w.t(), t, reduction="sum")
    (ref / 7).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = loss_head.linear_cross_entropy(h, w, t, chunk=chunk)
    (got / 7).backward()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(h.grad, gh, atol=1e-5) and torch.allclose(w.grad, gw, atol=1e-5)


def test_add_product_fp32_on_cpu_and_gpu():
    """The weight gradient's accumulation: fp32 sum of 16-bit products (on a GPU inside the matmul)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        torch.manual_seed(3)
        a = torch.randn(48, 40, device=device, dtype=torch.bfloat16)
        b = torch.randn(40, 24, device=device, dtype=torch.bfloat16)
        total = torch.ones(48, 24, device=device)
        loss_head.add_product_fp32(total, a, b)
        loss_head.add_product_fp32(total, a, b)
        want = 1 + 2 * (a.float() @ b.float())
        assert total.dtype == torch.float32
        assert (total - want).abs().max() / want.abs().max() < 1e-2, device  # at most a bf16 rounding per product


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_linear_cross_entropy_trained_bf16_head_on_gpu():
    """Full fine-tuning's head on a GPU (its weight gradient summed in fp32 by the matmul): plain's loss and
    gradients within bf16 rounding."""
    torch.manual_seed(4)
    h = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(1000, 64, device="cuda") * 0.1).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, 1000, (300,), device="cuda")
    ref = F.cross_entropy((h @ w.t()).float(), t, reduction="sum")
    ref.backward()
    gh, gw = h.grad.float(), w.grad.float()
    h.grad = w.grad = None
    got = loss_head.linear_cross_entropy(h, w, t, chunk=64, row_multiple=32)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    assert (h.grad.float() - gh).abs().max() / gh.abs().max() < 2e-2
    assert (w.grad.float() - gw).abs().max() / gw.abs().max() < 2e-2


@pytest.mark.parametrize("rows", [37, 8, 3])
def test_linear_cross_entropy_padded_rows_equal_plain(rows):
    """gemm_row_multiple: chunks a multiple of 8 rows, the last one padded with zero rows: the same loss and
    gradients (the padding adds nothing), and every matmul sees a multiple of 8 rows."""
    torch.manual_seed(2)
    h = torch.randn(rows, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (rows,))
    ref = F.cross_entropy(h @ w.t(), t, reduction="sum")
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    seen = []
    matmul = torch.Tensor.__matmul__

    def spy(a, b):  # the rows' dimension: a's first (logits, input gradient) or, for the weight gradient, its second
        seen.append(a.shape[1] if a.shape[0] == 50 else a.shape[0])
        return matmul(a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "__matmul__", spy)
        got = loss_head.linear_cross_entropy(h, w, t, chunk=12, row_multiple=8)  # chunk rounded down to 8
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(h.grad, gh, atol=1e-5) and torch.allclose(w.grad, gw, atol=1e-5)
    assert seen and all(n % 8 == 0 for n in seen), seen
    # a multiple above the chunk: every matmul sees one chunk's rows (no more memory than the chunk the planner counts)
    seen.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "__matmul__", spy)
        again = loss_head.linear_cross_entropy(h.detach(), w.detach(), t, chunk=12, row_multiple=512)
    assert again.item() == pytest.approx(ref.item(), rel=1e-5) and set(seen) == {12}, seen


def test_linear_cross_entropy_frozen_weight_and_autocast():
    torch.manual_seed(1)
    h = torch.randn(20, 32, requires_grad=True)
    w = torch.randn(64, 32, dtype=torch.bfloat16)  # frozen bf16 head, as in LoRA training
    t = torch.randint(0, 64, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    ref.backward()
    g = h.grad.clone()
    h.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_head.linear_cross_entropy(h, w, t, chunk=6)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    assert (h.grad - g).abs().max() / g.abs().max() < 2e-2  # bf16 rounding of the logits' gradient
    empty = loss_head.linear_cross_entropy(h[:0], w, t[:0])
    assert empty.item() == 0.0


def _setup(cfg):
    from qvl.data.registry import load_mixture
    from qvl.models.load import load
    from qvl.train import components as comp
    from qvl.train.batches import Encoder

    torch.manual_seed(0)
    model, processor = load(cfg.model_name_or_path)
    model = comp.apply_training_mode(model, cfg)
    model.train()
    return model, Encoder(load_mixture(cfg.dataset_use, None, seed=cfg.seed), processor, cfg)


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    from train_helpers import make_colour_data

    return make_colour_data(tmp_path_factory.mktemp("speed"), 8, seed=4, text_only=3)


def _packed_loss_grads(model, lm, rows, rope_index):
    from qvl.data.preprocess import IGNORE_INDEX
    from qvl.train.batches import pack_micro_batch

    batches = [pack_micro_batch(r, rope_index) for r in rows]
    n = float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))
    model.zero_grad()
    total = 0.0
    for b in batches:
        loss, part = lm(b, n)
        loss.backward()
        total += float(part)
    return total / n, _grads(model)


def test_loss_module_fused_ce_equals_plain(make_cfg, mixed_data):
    """Full fine-tune (the lm_head weight trains too) and LoRA (frozen head): same loss and gradients."""
    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.train.loss_module import LossModule

    for kw in ({"tune_mm_llm": True}, {"tune_mm_llm": False, "lora_enable": True}):
        model, enc = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, **kw))
        use_packed_attention(model, "sdpa")
        rows = [[enc(0), enc(8), enc(1)], [enc(2), enc(3)]]
        ref = _packed_loss_grads(model, LossModule(model), rows, rope_index_fn(model))
        got = _packed_loss_grads(model, LossModule(model, fused_cross_entropy=True), rows, rope_index_fn(model))
        assert got[0] == pytest.approx(ref[0], rel=1e-5)
        assert _worst(got[1], ref[1]) < 1e-4


def test_loss_module_fused_ce_keeps_lora_on_the_lm_head(make_cfg, mixed_data):
    """lora_target_regex may put adapters on lm_head: the fused path must not bypass them (plain weight only)."""
    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.train.loss_module import LossModule

    model, enc = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, tune_mm_mlp=False,
                                 lora_enable=True, lora_target_regex=r"lm_head"))
    use_packed_attention(model, "sdpa")
    rows = [[enc(0), enc(8), enc(1)]]
    ref = _packed_loss_grads(model, LossModule(model), rows, rope_index_fn(model))
    got = _packed_loss_grads(model, LossModule(model, fused_cross_entropy=True), rows, rope_index_fn(model))
    assert any("lm_head.lora_B" in n for n in ref[1])
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert _worst(got[1], ref[1]) < 1e-4


# ---------------------------------------------------------------- selective checkpointing

def test_spread_and_ratio_for_memory():
    assert recompute.spread(0, 36) == [] and recompute.spread(36, 36) == list(range(36))
    assert recompute.spread(2, 4) == [1, 3] and len(recompute.spread(9, 36)) == 9
    assert recompute.ratio_for_memory(36, free_bytes=10e9, layer_bytes=1e9) == pytest.approx(26 / 36)
    assert recompute.ratio_for_memory(36, free_bytes=-1, layer_bytes=1e9) == 1.0
    assert recompute.ratio_for_memory(36, free_bytes=1e12, layer_bytes=1e9) == 0.0


def test_selective_checkpointing_same_gradients(make_cfg, mixed_data):
    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.train import components as comp
    from qvl.train.loss_module import LossModule

    model, enc = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, lora_enable=True))
    use_packed_attention(model, "sdpa")
    rows = [[enc(0), enc(8), enc(1), enc(2)]]
    lm = LossModule(model)
    ref = _packed_loss_grads(model, lm, rows, rope_index_fn(model))
    comp.enable_gradient_checkpointing(model)
    n = len(recompute.decoder_layers(model))
    assert recompute.checkpoint_some_layers(model, 0.5) == recompute.spread(n // 2, n)
    got = _packed_loss_grads(model, lm, rows, rope_index_fn(model))
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    assert _worst(got[1], ref[1]) < 1e-5
    assert recompute.checkpoint_some_layers(model, 1.0) == recompute.spread(n // 2, n)  # never turns recompute back on
    with pytest.raises(QvlError, match="gradient_checkpointing_ratio"):
        recompute.checkpoint_some_layers(model, 1.5)


# ---------------------------------------------------------------- regional compilation

def _all_steps(model, lm, steps, seeded: bool = False) -> list:
    """(loss, gradients) of each step of packed rows; ``seeded``: torch's seed set to the step's index first (random
    ops in play)."""
    from qvl.data.packing import rope_index_fn

    out = []
    for i, rows in enumerate(steps):
        if seeded:
            torch.manual_seed(i)
        out.append(_packed_loss_grads(model, lm, rows, rope_index_fn(model)))
    return out


def _compiled_equals(model, lm, steps, ref, scope: str, check, backend: str = "aot_eager", seeded: bool = False) -> int:
    """Compile the layers (``backend``: aot_eager on CPU unless said, ``scope``), ``check(modules compiled)``, run
    ``steps`` of packed rows (:func:`_all_steps`): the same losses and gradients as ``ref``. Returns dynamo's unique
    graphs; always uncompiles."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        check(compile.compile_layers(model, backend=backend, scope=scope))
        got = _all_steps(model, lm, steps, seeded)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        compile.uncompile(model)
        torch._dynamo.reset()
    for (gl, gg), (rl, rg) in zip(got, ref):
        assert gl == pytest.approx(rl, rel=1e-5)
        assert _worst(gg, rg) < 1e-4
    return graphs


def test_what_cannot_compile_runs_eagerly_said_in_one_line(tmp_path, caplog):
    """compile_layers auto (dynamo's suppress_errors): a function the backend fails on runs eagerly and gives the
    same output; dynamo's pages of traceback are kept from the log, and the loop says one line naming the function
    and the backend's own error, with the whole text in the output folder's compile_errors.log."""
    import logging

    import torch._dynamo

    def failing_backend(gm, example_inputs):  # as inductor's partitioner failed on a GPU (2026-12-05)
        raise AssertionError("Node add_601 was invalid, but is output")

    class Layer(torch.nn.Module):  # a module of ours: torch 2.11 does not trace torch's own nn.Linear alone
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x).relu()

    torch.manual_seed(0)
    layer, x = Layer(), torch.randn(2, 4)
    want = layer(x)
    failures = compile.CompileFailures().attach()
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(suppress_errors=True), caplog.at_level(logging.WARNING):
            layer.compile(backend=failing_backend)
            got = layer(x)
    finally:
        failures.detach()
        torch._dynamo.reset()
    assert torch.equal(got, want)
    assert not [r for r in caplog.records if "WON'T CONVERT" in r.getMessage()]
    lines = []
    compile.say_failures(failures.take(), tmp_path, lines.append)
    assert lines and len(set(lines)) == len(lines), lines  # one line per function (dynamo may retry a frame)
    for line in lines:
        assert line.startswith("compile_layers: torch.compile could not build ")
        assert "AssertionError: Node add_601 was invalid, but is output" in line and "runs eagerly" in line
    log = (tmp_path / compile.COMPILE_ERRORS).read_text()
    assert "WON'T CONVERT" in log and "Traceback" in log
    said = len(lines)
    compile.say_failures(failures.take(), tmp_path, lines.append)  # each failure said once
    assert len(lines) == said


@pytest.mark.parametrize("attention", ["sdpa", "per_sample"])
def test_compiled_layers_equal_eager_without_recompiling(make_cfg, mixed_data, attention):
    """aot_eager on CPU (dynamo + AOTAutograd, the parts inductor builds on): same loss and grads, and rows of
    three different lengths reuse one graph per compiled part. per_sample attention compiles whole too: the
    loss module hands it the sample bounds as inputs (no host read inside the layer), compared with the
    eager per-slice path that finds them itself."""
    import torch._dynamo

    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.train.loss_module import LossModule

    model, enc = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, lora_enable=True))
    use_packed_attention(model, attention)
    n_parts = len(compile.COMPILED_PARTS)
    steps = [[[enc(0), enc(8)]], [[enc(1), enc(2), enc(9)]], [[enc(3)], [enc(10)]]]
    ref = [_packed_loss_grads(model, LossModule(model, fused_cross_entropy=True), rows, rope_index_fn(model))
           for rows in steps]
    lm = LossModule(model, fused_cross_entropy=True, bounds_as_inputs=attention == "per_sample")

    def compiled(n):
        assert n == n_parts * len(recompute.decoder_layers(model))

    graphs = _compiled_equals(model, lm, steps, ref, "parts", compiled)
    assert 0 < graphs <= 2 * n_parts, graphs  # no recompile per layer or per row length
    assert compile.compile_wanted("auto", torch.device("cpu")) is False
    assert compile.compile_wanted("auto", torch.device("cuda", 0)) is True


def test_compiled_vision_blocks_equal_eager(make_cfg, mixed_data):
    """A frozen tower's blocks compiled (aot_eager on CPU): the same tower outputs (merged features and deepstack
    features) for two inputs of different patch counts; nothing compiled when a vision weight trains."""
    from qvl.models.attention import use_vision_sdpa
    from qvl.train.loss_module import _tensors

    model, _ = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, lora_enable=True))
    use_vision_sdpa(model)
    visual = model.get_base_model().model.visual
    vc = visual.config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    torch.manual_seed(3)
    inputs = []
    for grid in ([[1, 4, 4]], [[2, 4, 6], [1, 2, 2]]):
        grid = torch.tensor(grid)
        inputs.append((torch.randn(int(grid.prod(-1).sum()), patch_dim), grid))
    with torch.no_grad():
        ref = [[t.clone() for t in _tensors(visual(x, grid_thw=g))] for x, g in inputs]
        n = compile.compile_vision_blocks(model, backend="aot_eager")
        assert n == len(visual.blocks) > 0
        assert all(b._compiled_call_impl is not None for b in visual.blocks)
        got = [list(_tensors(visual(x, grid_thw=g))) for x, g in inputs]
    compile.uncompile(model)
    assert all(b._compiled_call_impl is None for b in visual.blocks)
    for r, g in zip(ref, got):
        assert len(r) == len(g) > 1
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(r, g))
    visual.blocks[0].mlp.linear_fc1.weight.requires_grad_(True)  # a tower that trains: left eager
    assert compile.compile_vision_blocks(model, backend="aot_eager") == 0


@pytest.mark.parametrize("attention", ["sdpa", "per_sample"])
def test_whole_layer_compile_with_recompute_equals_eager(make_cfg, mixed_data, attention):
    """scope="layer": each decoder layer compiles whole (LoRA adapters and residual adds included) with its
    gradient checkpointing inside the compiled code. Half the layers recompute: same loss and gradients as the eager
    model over rows of three lengths, one graph for every layer and length, the same state dict, and uncompile puts
    transformers' checkpointing back as it was."""

    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.train import components as comp
    from qvl.train.loss_module import LossModule

    model, enc = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, lora_enable=True))
    use_packed_attention(model, attention)
    comp.enable_gradient_checkpointing(model)
    layers = recompute.decoder_layers(model)
    recomputed = recompute.checkpoint_some_layers(model, 0.5)
    steps = [[[enc(0), enc(8)]], [[enc(1), enc(2), enc(9)]], [[enc(3)], [enc(10)]]]
    ref = [_packed_loss_grads(model, LossModule(model, fused_cross_entropy=True), rows, rope_index_fn(model))
           for rows in steps]
    keys = list(model.state_dict())
    lm = LossModule(model, fused_cross_entropy=True, bounds_as_inputs=attention == "per_sample")

    def compiled(n):
        assert n == len(layers)
        assert [i for i, layer in enumerate(layers) if layer.qvl_recompute] == recomputed
        assert not any(layer.gradient_checkpointing for layer in layers)  # transformers' own wrapper is off
        assert list(model.state_dict()) == keys

    graphs = _compiled_equals(model, lm, steps, ref, "layer", compiled)
    assert 0 < graphs <= 4, graphs  # recomputed and kept layers, any row length: no recompile per layer
    assert [i for i, layer in enumerate(layers) if layer.gradient_checkpointing] == recomputed
    assert all(not hasattr(type(layer), "qvl_base_class") for layer in layers)
    with pytest.raises(QvlError, match="compile_scope"):
        compile.compile_layers(model, scope="model")


def test_whole_layer_compile_with_recompute_and_dropout_equals_eager(make_cfg, mixed_data):
    """LoRA dropout in whole compiled layers (inductor) that recompute: their random ops run as eager kernels
    (compile.eager_random_ops; inductor's own failed to partition on torch 2.11, "Node add_547 was invalid, but is
    output", reproduced on a CPU), so forward and recompute draw the masks eager draws: the same losses and gradients
    as the eager model from the same seeds (gradients differ with another mask: LoRA B starts at zero, its gradient
    is the dropped input's)."""
    import torch._inductor.config as inductor_config

    from qvl.data.packing import use_packed_attention
    from qvl.train import components as comp
    from qvl.train.loss_module import LossModule

    model, enc = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, lora_enable=True,
                                 lora_dropout=0.3))
    use_packed_attention(model, "per_sample")
    comp.enable_gradient_checkpointing(model)
    recompute.checkpoint_some_layers(model, 0.5)
    steps = [[[enc(0), enc(8)]], [[enc(1), enc(2), enc(9)]]]
    lm = LossModule(model, fused_cross_entropy=True, bounds_as_inputs=True)

    ref = _all_steps(model, lm, steps, seeded=True)

    def eager_dropout(n):
        assert n == len(recompute.decoder_layers(model))
        assert "recompute" in compile.eager_random_ops(torch.device("cpu"), True, recompute_inside=True)
        assert inductor_config.fallback_random

    assert _compiled_equals(model, lm, steps, ref, "layer", eager_dropout, backend="inductor", seeded=True) > 0
    assert compile.eager_random_ops(torch.device("cpu"), False, recompute_inside=True) is None


def _saved_bytes(model, lm, rows, rope_index) -> int:
    """Bytes the forward pass of ``rows`` keeps for backward, parameters left out."""
    from qvl.train.batches import pack_micro_batch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    batches = [pack_micro_batch(r, rope_index) for r in rows]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = [lm(b, 1.0)[0] for b in batches]
    sum(losses).backward()
    model.zero_grad()
    return sum(kept.values())


def test_activation_memory_budget_keeps_less_for_the_same_gradients(make_cfg, mixed_data):
    """activation_memory_budget (the compiler's partitioner, min-cut as inductor's; aot_eager on CPU): whole compiled
    layers without checkpointing keep less for backward under a budget of 0.5, and give the eager model's loss and
    gradients (only what is recomputed changes)."""
    import torch._functorch.config as functorch_config

    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.train.loss_module import LossModule

    model, enc = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, lora_enable=True))
    use_packed_attention(model, "per_sample")
    steps = [[[enc(0), enc(8)]], [[enc(1), enc(2), enc(9)]]]
    ref = [_packed_loss_grads(model, LossModule(model, fused_cross_entropy=True), rows, rope_index_fn(model))
           for rows in steps]
    lm = LossModule(model, fused_cross_entropy=True, bounds_as_inputs=True)
    kept = {}
    for budget in (1.0, 0.5):
        def measure(n, budget=budget):
            kept[budget] = _saved_bytes(model, lm, steps[1], rope_index_fn(model))

        with functorch_config.patch(activation_memory_budget=budget):
            _compiled_equals(model, lm, steps, ref, "layer", measure)
    assert kept[0.5] < 0.8 * kept[1.0], kept


class _OpsInBackward(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the attention forward calls and the matmuls the backward pass runs."""

    def __init__(self):
        super().__init__()
        self.attention, self.mm = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.attention += ("attention" in name or "attn" in name) and "backward" not in name
        self.mm += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def _loss_grads_counting(model, lm, row, rope_index):
    from qvl.data.preprocess import IGNORE_INDEX
    from qvl.train.batches import pack_micro_batch

    batch = pack_micro_batch(row, rope_index)
    n = float(int((batch["labels"] != IGNORE_INDEX).sum()))
    model.zero_grad()
    loss, part = lm(batch, n)
    with _OpsInBackward() as ops:
        loss.backward()
    return float(part) / n, _grads(model), ops


def test_recompute_mlp_only_keeps_attention(make_cfg, mixed_data):
    """gradient_checkpointing_scope=mlp: the recompute in backward runs no attention and fewer matmuls (the q/k/v/o
    projections' outputs are kept), and the loss and gradients equal recomputing whole layers, eager and compiled
    (aot_eager, whole layers: the policy goes into the compiled graph)."""
    import torch._dynamo

    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.plan.memory import attention_saved_bytes_per_token
    from qvl.train import components as comp
    from qvl.train.loss_module import LossModule

    model, enc = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, lora_enable=True,
                                 lora_r=8))
    use_packed_attention(model, "per_sample")
    comp.enable_gradient_checkpointing(model)
    n_layers = len(recompute.decoder_layers(model))
    row, rope = [enc(0), enc(8), enc(1)], rope_index_fn(model)
    lm = LossModule(model, fused_cross_entropy=True, bounds_as_inputs=True)
    ref_loss, ref_grads, whole = _loss_grads_counting(model, lm, row, rope)
    assert recompute.recompute_scope(model, "mlp") == n_layers
    loss, grads, selective = _loss_grads_counting(model, lm, row, rope)
    assert loss == pytest.approx(ref_loss, rel=1e-6) and _worst(grads, ref_grads) < 1e-5
    assert whole.attention == n_layers * len(row) and selective.attention == 0  # per_sample on CPU: one per sample
    assert selective.mm <= whole.mm - 4 * n_layers  # q, k, v, o not recomputed
    torch._dynamo.reset()
    try:
        marker = compile.compile_marker()
        compile.compile_layers(model, backend="aot_eager", scope="layer")
        loss, grads, _ = _loss_grads_counting(model, lm, row, rope)
        # the first step's line splits the compile time by what compiled: here the one graph all layers share
        assert [what for what, _ in compile.compiled_functions(marker)] == ["decoder layer"]
        assert compile.compiled_functions(compile.compile_marker()) == []
    finally:
        compile.uncompile(model)
        torch._dynamo.reset()
    assert loss == pytest.approx(ref_loss, rel=1e-5) and _worst(grads, ref_grads) < 1e-4
    assert recompute.recompute_scope(model, "layer") == 0
    with pytest.raises(QvlError, match="gradient_checkpointing_scope"):
        recompute.recompute_scope(model, "attention")
    with pytest.raises(QvlError, match="LoRA rank 32"):  # kv_dim of the tiny model
        recompute.recompute_scope(model, "mlp", lora_r=32)
    from qvl.plan.model import resolve_model

    m = resolve_model("8B")
    assert attention_saved_bytes_per_token(m) == 2 * (2 * 4096 + 2 * 1024 + 4096) + 4 * 32


def test_compile_auto_only_where_measured(make_cfg):
    """The default (auto) compiles on a GPU for packed per_sample rows of a dense model on one GPU / DDP; true forces
    it outside that; sharding engines never; the reason is said whenever a wish is not granted."""
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert make_cfg().compile_layers == "auto"
    assert compile.compile_choice("auto", gpu, "ddp", True, False) == (True, "auto")
    assert compile.compile_choice("auto", cpu, "ddp", True, False) == (False, "")
    assert compile.compile_choice(False, gpu, "ddp", True, False) == (False, "")
    for args in (("ddp", False, False), ("ddp", True, True), ("deepspeed", True, False), ("fsdp", True, False)):
        on, why = compile.compile_choice("auto", gpu, *args)
        assert not on and why
    on, why = compile.compile_choice("auto", gpu, "ddp", True, False, varlen=False)  # no flash varlen: L x L masks
    assert not on and "varlen" in why
    on, why = compile.compile_choice("auto", gpu, "ddp", True, False, quantized=True)  # QLoRA: eager unless asked
    assert not on and "compile_layers=true" in why
    assert compile.compile_choice(True, gpu, "ddp", True, False, quantized=True) == (True, "on")
    assert compile.compile_choice(True, gpu, "ddp", False, True) == (True, "on")
    assert compile.compile_choice(True, gpu, "fsdp", True, False)[0] is False


def test_whole_layer_compile_told_before_the_model_loads(make_cfg):
    """compiles_whole_layers (what activation_memory_budget auto is chosen for) follows compile_layers and
    compile_scope, from the config alone."""
    from qvl.train.loop import compiles_whole_layers

    cpu = torch.device("cpu")
    assert make_cfg().gradient_checkpointing_scope == "auto"
    assert not compiles_whole_layers(make_cfg(data_flatten=True), cpu)  # auto compiles nothing on CPU
    assert compiles_whole_layers(make_cfg(data_flatten=True, compile_layers=True), cpu)
    assert not compiles_whole_layers(make_cfg(data_flatten=True, compile_layers=True, compile_scope="parts"), cpu)


def test_train_restores_dynamos_error_setting(make_cfg, monkeypatch):
    """compile_layers' eager fallback (dynamo's process-wide suppress_errors), its floats traced as constants
    (specialize_float) and the partitioner's activation_memory_budget last for the run only."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    from qvl.train import loop

    def fake_train(cfg, log, callbacks):
        with pytest.raises(TypeError):  # no decoder layers to compile; the setting is made first
            compile.compile_layers(torch.nn.Module(), eager_fallback=True)
        functorch_config.activation_memory_budget = 0.8
        assert torch._dynamo.config.suppress_errors is True and torch._dynamo.config.specialize_float is True
        return "done"

    monkeypatch.setattr(loop, "_train", fake_train)
    settings = lambda: (torch._dynamo.config.suppress_errors, torch._dynamo.config.specialize_float,  # noqa: E731
                        functorch_config.activation_memory_budget)
    with torch._dynamo.config.patch(specialize_float=False):
        before = settings()
        assert loop.train(make_cfg()) == "done"
        assert settings() == before


# ---------------------------------------------------------------- LoRA inputs under autocast

def test_lora_inputs_stay_16bit_changes_no_value(make_cfg, mixed_data):
    """bf16 base, fp32 adapters, bf16 autocast (the training setup): without PEFT's fp32 cast of each LoRA
    input the loss and every adapter gradient are bit-identical, and the cast really is off."""
    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.train.loss_module import LossModule

    model, enc = _setup(make_cfg(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, lora_enable=True,
                                 lora_dropout=0.0))
    model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    use_packed_attention(model, "sdpa")
    lm = LossModule(model, fused_cross_entropy=True)
    rows = [[enc(0), enc(8)], [enc(1)]]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _packed_loss_grads(model, lm, rows, rope_index_fn(model))

    ref_loss, ref_grads = run()
    assert components.lora_inputs_stay_16bit(model) > 0
    assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in model.modules() if hasattr(m, "lora_A"))
    loss, grads = run()
    assert loss == ref_loss
    assert set(grads) == set(ref_grads) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


# ---------------------------------------------------------------- optimizer, rows, host syncs

def test_fused_adamw_equals_foreach():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True)
    b = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, fused=True)  # CPU has the fused kernel too
    for _ in range(5):
        g = [torch.randn_like(p) for p in ps]
        for p, q, gi in zip(ps, qs, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        a.step()
        b.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ps, qs))
    assert optimizers.torch_adamw_options("adamw_torch", torch.device("cuda", 0)) == {"fused": True}
    assert optimizers.torch_adamw_options("adamw_torch_foreach", torch.device("cuda", 0)) == {"foreach": True}
    assert optimizers.torch_adamw_options("adamw_torch", torch.device("cpu")) == {}


def test_rows_by_budget():
    rows = batches.row_groups([100, 900, 300, 700, 2000, 50], 1000)
    assert sorted(i for r in rows for i in r) == list(range(6))
    lengths = [100, 900, 300, 700, 2000, 50]
    assert all(sum(lengths[i] for i in r) <= 1000 or len(r) == 1 for r in rows)
    assert [4] in rows and len(rows) == 4  # the 2,000-token sample alone; 900+100, 700+300(+50 somewhere)
    assert batches.row_groups([10, 10], 100) == [[0, 1]]


def test_host_floats():
    assert host.host_floats(torch.tensor(1.5), None, 2, torch.tensor([3.0])) == [1.5, None, 2.0, 3.0]
    assert host.host_floats() == []


# ---------------------------------------------------------------- the loop: levers on vs off

def test_loop_with_levers_trains_like_plain(make_cfg, mixed_data, tmp_path):
    """Same data and seeds: fused CE + selective checkpointing + token-budget rows give the plain loop's loss
    curve and gradient norms (4 samples per step, 2 micro-batches of 2 -> rows of <= 4,096 tokens)."""
    kw = dict(dataset_use=mixed_data, data_flatten=True, tune_mm_llm=False, lora_enable=True,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, save_strategy="no")
    plain = train(make_cfg(output_dir=str(tmp_path / "plain"), fused_cross_entropy=False, **kw), **quiet)
    fast = train(make_cfg(output_dir=str(tmp_path / "fast"), gradient_checkpointing=True,
                          gradient_checkpointing_ratio=0.5, packed_row_tokens=4096, **kw), **quiet)
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4)
    ga = [r["grad_norm"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    gb = [r["grad_norm"] for r in read_metrics(tmp_path / "fast" / "metrics.jsonl")]
    assert gb == pytest.approx(ga, rel=1e-3)


def test_speed_config_keys(make_cfg):
    cfg = make_cfg(data_flatten=True, packed_row_tokens=16384, gradient_checkpointing_ratio=0.25,
                   compile_layers="auto")
    assert cfg.fused_cross_entropy and cfg.compile_layers == "auto" and cfg.packed_row_tokens == 16384
    with pytest.raises(QvlError, match="packed_row_tokens"):
        make_cfg(packed_row_tokens=4096, data_flatten=False)  # nothing packed
    # the longest row a micro-batch makes: batch x length, or the budget (a longer sample alone), or the whole step
    kw = dict(data_flatten=True, per_device_train_batch_size=4, model_max_length=4096)
    assert make_cfg(**kw).longest_row() == 16384
    assert make_cfg(packed_row_tokens=2048, **kw).longest_row() == 4096
    assert make_cfg(packed_row_tokens=8192, **kw).longest_row() == 8192
    assert make_cfg(packed_row_tokens=10**6, gradient_accumulation_steps=2, **kw).longest_row() == 32768
    with pytest.raises(QvlError, match="gradient_checkpointing_ratio"):
        make_cfg(gradient_checkpointing_ratio=1.5)
    with pytest.raises(QvlError, match="optim"):
        make_cfg(optim="sgd")


def test_queued_host_read_gives_host_floats():
    """Off CUDA a queued read is a plain read when asked: the same floats as host_floats."""
    queued = host.queue_host_read(torch.tensor(1.5), None, 2, torch.tensor([3.0]))
    assert host.host_read(queued) == [1.5, None, 2.0, 3.0]
    assert host.host_read(host.queue_host_read()) == []


def test_step_seconds_off_cuda_are_unknown():
    """Off CUDA there is no GPU clock: the tracker falls back to the time between reports."""
    first, second = host.queue_host_read(torch.tensor(1.0)), host.queue_host_read(torch.tensor(2.0))
    assert host.seconds_between(None, second) is None and host.seconds_between(first, second) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_step_seconds_come_from_the_gpu_clock():
    """Between two queued reads lies the GPU work queued between them, however late the host reads them."""
    first = host.queue_host_read(torch.ones((), device="cuda"))
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU work (cycles at ~2 GHz)
    second = host.queue_host_read(torch.ones((), device="cuda"))
    host.host_read(first), host.host_read(second)
    time.sleep(0.5)  # a late read changes nothing
    assert 0.2 < host.seconds_between(first, second) < 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_queued_host_read_waits_for_its_own_work_only():
    """A read queued before later GPU work returns while that work still runs (a plain read would wait for it)."""
    loss = torch.full((), 2.5, device="cuda")
    queued = host.queue_host_read(loss, None)
    torch.cuda._sleep(4_000_000_000)  # ~2 s of GPU work queued after the copy
    later = torch.cuda.Event()
    later.record()
    assert host.host_read(queued) == [2.5, None]
    assert not later.query()  # the later work is still running: the read did not wait for it
    torch.cuda.synchronize()


def test_host_floats_mixes_devices_and_plain_numbers():
    from qvl.train.host import host_floats

    meta_free = torch.tensor(2.5, dtype=torch.float64)  # another dtype (and, on a GPU, possibly another device)
    assert host_floats(torch.tensor(1.0), meta_free, None, 3) == [1.0, 2.5, None, 3.0]


def test_gemm_rows_ladder():
    """gemm_rows: every multiple up to 15 of them, then 8 sizes per doubling (at most 1/8 more rows); gemm_ladder
    lists exactly the sizes it gives."""
    from qvl.train.loss_head import gemm_ladder, gemm_rows

    assert [gemm_rows(n, 128) for n in (1, 128, 129, 15 * 128, 15 * 128 + 1)] == [128, 128, 256, 1920, 2048]
    assert gemm_rows(5, 0) == 5 and gemm_ladder(1000, 0) == []
    made = {gemm_rows(n, 8) for n in range(1, 5001)}
    assert sorted(made) == gemm_ladder(5000, 8)
    for n in range(1, 5001):
        r = gemm_rows(n, 8)
        assert r >= n and r % 8 == 0 and (r - n < 8 or (r - n) * 8 < n + 8 * 8)
    assert len([s for s in made if 1024 < s <= 2048]) == 8  # sizes per doubling, above 15 multiples


def test_warm_loss_head_meets_each_chunk_shape(monkeypatch):
    from qvl.train import loss_head

    seen = []
    real = loss_head._LinearCrossEntropy.apply
    monkeypatch.setattr(loss_head._LinearCrossEntropy, "apply",
                        lambda h, w, t, chunk, m: seen.append((h.shape[0], chunk, m)) or real(h, w, t, chunk, m))
    weight = torch.randn(50, 16)
    assert loss_head.warm_loss_head(weight, 8, 30) == 4  # 8, 16, 24, 32 rows: up to 30 label rows
    assert [(n, m) for n, _, m in seen] == [(8, 8), (16, 8), (24, 8), (32, 8)]
    assert loss_head.warm_loss_head(weight, 0, 30) == 0
    chunk, multiple = loss_head.loss_chunk_rows(151_936, 2, 128)  # Qwen3-VL's vocabulary in bf16: 294 rows -> 256
    assert (chunk, multiple) == (256, 128)


def test_embeddings_to_host_and_back():
    """host_embeddings: the frozen table moves to the host and back, lookups there equal the embedding's; a table
    that trains or is tied to the LM head stays."""
    from qvl.train import host

    class Toy(torch.nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
            self.emb.weight.requires_grad_(False)
            if tied:
                self.head.weight = self.emb.weight

        def get_input_embeddings(self):
            return self.emb

        def get_output_embeddings(self):
            return self.head

    toy = Toy(tied=False)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = toy.emb(ids)
    table = host.embeddings_to_host(toy)
    torch.testing.assert_close(host.host_embed(table, ids, pin=False), want)
    host.embeddings_to_device(toy, "cpu")
    with pytest.raises(ValueError, match="tied"):
        host.embeddings_to_host(Toy(tied=True))
    toy.emb.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="train"):
        host.embeddings_to_host(toy)


def test_gemm_multiple_auto_is_on_for_one_gpu_or_ddp_only():
    from qvl.train.loss_head import gemm_multiple_for

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert gemm_multiple_for("auto", cuda) == 128 and gemm_multiple_for("auto", cuda, "ddp") == 128
    assert gemm_multiple_for("auto", cpu) == 0 and gemm_multiple_for("auto", cuda, "deepspeed") == 0
    assert gemm_multiple_for(512, cpu) == 512 and gemm_multiple_for(0, cuda) == 0


def test_compile_times_json_says_where_the_compile_went(tmp_path):
    """The output folder's compile_times.json: torch.compile's own phase timers (nested, longest first) and the
    functions compiled, so a slow first step can be taken apart without a profiler; nothing when nothing compiled."""
    import json

    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import compilation_time_metrics

    kept = dict(compilation_time_metrics)
    compilation_time_metrics.clear()
    try:
        compile.write_compile_times(tmp_path, "after the first step")
        assert not (tmp_path / compile.COMPILE_TIMES).exists()
        f = torch.compile(lambda x: (x * 2).relu(), backend="aot_eager")
        f(torch.randn(3))
        assert compile.phase_seconds(minimum=0.0)  # something was timed
        compilation_time_metrics["_compile.compile_inner"].append(1.5)  # a compile long enough to list
        compile.write_compile_times(tmp_path, "after the first step")
    finally:
        compilation_time_metrics.clear()
        compilation_time_metrics.update(kept)
        torch._dynamo.reset()
    got = json.loads((tmp_path / compile.COMPILE_TIMES).read_text())
    assert got["when"] == "after the first step" and "_compile.compile_inner" in got["phases_s"]
    phases = list(got["phases_s"].values())
    assert phases == sorted(phases, reverse=True) and min(phases) >= 0.5
