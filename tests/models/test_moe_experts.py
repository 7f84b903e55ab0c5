"""The grouped-GEMM experts (qvl.models.moe_experts) against transformers + peft on the tiny MoE: the same outputs,
input gradients, and gradients of the experts' LoRA factors, the attention adapters and the router."""

from __future__ import annotations

import pytest
import torch

from qvl.models import moe_experts as me

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def moe_lora():
    """The tiny MoE with qvl's LoRA (attention + experts, r=4), random B factors (peft starts them at zero, which
    would leave A's gradients zero) and a trainable router."""
    from qvl.models.build import tiny_parts
    from qvl.train import components as comp
    from qvl.train.config import build_config

    model, _ = tiny_parts(variant="moe")
    cfg = build_config({"model_name_or_path": "x", "dataset_use": "x", "output_dir": "x", "lora_enable": True,
                        "lora_r": 4, "lora_alpha": 8})
    model = comp.apply_training_mode(model, cfg)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
        if name.endswith("mlp.gate.weight"):
            p.requires_grad_(True)
    return model


@pytest.fixture
def plain(moe_lora):
    """The model as transformers + peft run it; whatever a test installs is undone after it."""
    me.uninstall(moe_lora)
    yield moe_lora
    me.uninstall(moe_lora)
    moe_lora.set_experts_implementation("grouped_mm")


def _no_loop(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the kernel path was expected, not the loop")

    monkeypatch.setattr(me, "looped_mm", refuse)


def _step(module, x, seed=1):
    """Output, input gradient and trainable parameters' gradients of ``module(x)`` under a fixed random cotangent."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype))
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def _close(a, b, atol=1e-6, rtol=1e-5):
    out_a, gx_a, grads_a = a
    out_b, gx_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx_a, gx_b, atol=atol, rtol=rtol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_is_a_loop_over_the_groups(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 16, generator=gen).to(dtype).requires_grad_(True)
    w = torch.randn(4, 16, 32, generator=gen).to(dtype).requires_grad_(True)
    offs = torch.tensor([5, 5, 17, 23], dtype=torch.int32)  # an empty group too
    assert me.kernel_fits(x, w)
    y = me.grouped_mm(x, w, offs)
    ref = torch.cat([x[0:5] @ w[0], x[5:17] @ w[2], x[17:23] @ w[3]])
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(me.looped_mm(x, w, offs), ref)
    cot = torch.randn(y.shape, generator=gen).to(dtype)
    gx, gw = torch.autograd.grad(y, (x, w), cot)
    rx, rw = torch.autograd.grad(ref, (x, w), cot)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    odd = torch.randn(4, 16, 6, generator=gen).to(dtype)  # 6 columns: rows of 12 / 24 bytes, not 16-byte aligned
    assert not me.kernel_fits(x, odd)
    torch.testing.assert_close(me.grouped_mm(x, odd, offs), torch.cat([x[0:5] @ odd[0], x[5:17] @ odd[2],
                                                                         x[17:23] @ odd[3]]))


@pytest.mark.parametrize("implementation,peft_factors", [("eager", True), ("grouped_mm", True), ("eager", False)])
def test_block_matches_transformers_and_peft(plain, monkeypatch, implementation, peft_factors):
    """One MoE block (router + experts with LoRA on gate_up_proj and down_proj): outputs, input gradients, the four
    LoRA factors' and the router's gradients, against transformers' expert loop and its grouped_mm path under peft;
    with peft's own factors and with them read from its layout (peft without ``get_delta_factors``)."""
    plain.set_experts_implementation(implementation)
    block = plain.base_model.model.model.language_model.layers[0].mlp
    x = torch.randn(2, 19, block.gate.hidden_dim, generator=torch.Generator().manual_seed(2))
    ref = _step(block, x)
    if not peft_factors:  # after the reference: this peft's own forward reads the factors through it
        from peft.tuners.lora.layer import ParamWrapper

        monkeypatch.delattr(ParamWrapper, "get_delta_factors", raising=False)
    assert me.install(plain) == len(plain.base_model.model.model.language_model.layers)
    _no_loop(monkeypatch)
    fast = _step(block, x)
    assert sorted(fast[2]) == ["experts.base_layer.lora_A.default.weight", "experts.base_layer.lora_B.default.weight",
                               "experts.lora_A.default.weight", "experts.lora_B.default.weight", "gate.weight"]
    _close(fast, ref)


def test_model_loss_and_gradients_match(plain, monkeypatch):
    """The whole tiny MoE (attention adapters, experts' adapters, routers): loss and every gradient."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, plain.config.text_config.vocab_size, (2, 24), generator=gen)

    def step():
        plain.zero_grad(set_to_none=True)
        loss = plain(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}

    ref_loss, ref = step()
    assert me.has_expert_lora(plain)
    me.install(plain)
    _no_loop(monkeypatch)
    loss, grads = step()
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref.keys() and any(".experts." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_odd_ranks_and_states_it_leaves_to_peft(plain, monkeypatch):
    """A LoRA rank whose rows miss the kernel's 16-byte alignment (3 floats) is padded with zero ranks: the kernel
    still runs, with the same result as the delta folded into the weight; disabled adapters run peft's own forward;
    uninstall restores it."""
    block = plain.base_model.model.model.language_model.layers[1].mlp
    x = torch.randn(1, 11, block.gate.hidden_dim, generator=torch.Generator().manual_seed(4))
    me.install(plain)
    factors = me.delta_factors(block.experts, "default")  # peft's own where it has it (0.21 on)
    hidden = x.view(-1, x.shape[-1])
    _, weights, index = block.gate(hidden)
    experts = block.experts.base_layer.base_layer
    lhs, rhs, s = factors
    cut = (lhs[..., :3], rhs[:, :3], s)  # rank 3: 12-byte rows
    args = (hidden, index, weights, experts.gate_up_proj, experts.down_proj, experts.act_fn, None)
    w = experts.down_proj + s * cut[0] @ cut[1]
    ref = me.experts_output(hidden, index, weights, experts.gate_up_proj, w, experts.act_fn)
    with monkeypatch.context() as m:
        _no_loop(m)
        torch.testing.assert_close(me.experts_output(*args, cut), ref)
    with plain.disable_adapter():
        assert me._unwrap(block.experts) is None
        off = block(x)
    me.uninstall(plain)
    assert "forward" not in block.experts.__dict__
    with plain.disable_adapter():
        torch.testing.assert_close(off, block(x))


def test_compiles_in_bf16(plain):
    """The grouped path inside a compiled MoE block (bf16, the dtype torch's grouped GEMM compiles in), traced whole
    (no graph break: routing, peft's adapter state and the grouped GEMMs in one graph, forward and backward): the same
    outputs and gradients as eager. aot_eager keeps the test fast; inductor builds it on this CPU too (~45 s)."""
    import copy

    block = copy.deepcopy(plain.base_model.model.model.language_model.layers[0].mlp).to(torch.bfloat16)
    assert me.install(torch.nn.ModuleList([block])) == 1
    x = torch.randn(1, 32, block.gate.hidden_dim, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    eager = _step(block, x)
    block.compile(backend="aot_eager", dynamic=True, fullgraph=True)
    compiled = _step(block, x)
    _close(compiled, eager, atol=2e-2, rtol=2e-2)


def test_inductor_hands_the_kernel_a_layout_it_takes():
    """peft's B factors put the expert dim innermost; inductor dropped the ``.contiguous()`` before the grouped kernel,
    which then refused the strides (`qvl train compile_layers=true` on a MoE, CPU). Compiled by inductor: the same
    outputs and LoRA gradients as eager, fp32 factors cast to bf16 on the way as under autocast."""
    experts, out, rank, width = 4, 64, 16, 64
    gen = torch.Generator().manual_seed(7)
    b = torch.randn(out, rank * experts, generator=gen).requires_grad_(True)  # peft's lora_B weight layout
    a = torch.randn(rank * experts, width, generator=gen).requires_grad_(True)
    w = torch.randn(experts, out, width, generator=gen).to(torch.bfloat16)
    x = torch.randn(40, width, generator=gen).to(torch.bfloat16)
    offs = torch.tensor([10, 10, 25, 40], dtype=torch.int32)

    def lora_linear(x, offs):
        lhs = b.reshape(out, rank, experts).permute(2, 0, 1)
        return me.expert_linear(x, w, offs, (lhs.to(torch.bfloat16), a.reshape(experts, rank, width).to(torch.bfloat16),
                                             2.0))

    def run(fn):
        a.grad = b.grad = None
        y = fn(x, offs)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(y.dtype))
        return y.detach(), a.grad.clone(), b.grad.clone()

    for got, want in zip(run(torch.compile(lora_linear, backend="inductor", dynamic=True)), run(lora_linear)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_bf16_kernel_is_as_close_as_the_expert_loop(plain, monkeypatch, device):
    """In bf16 (CPU, and the GPU's kernel where there is one): the grouped kernel's outputs and gradients are as close
    to the fp32 reference (transformers' expert loop under peft) as transformers' own bf16 expert loop is."""
    import copy

    plain.set_experts_implementation("eager")
    block = plain.base_model.model.model.language_model.layers[0].mlp
    x = torch.randn(4, 300, block.gate.hidden_dim, generator=torch.Generator().manual_seed(6))
    ref = _step(block, x)
    model = copy.deepcopy(plain).to(device, torch.bfloat16)
    bf16_block = model.base_model.model.model.language_model.layers[0].mlp

    def step():
        out, gx, grads = _step(bf16_block, x.to(device, torch.bfloat16))
        return [out.float().cpu(), gx.float().cpu()] + [grads[n].float().cpu() for n in sorted(grads)]

    def errors(got):
        want = [ref[0], ref[1]] + [ref[2][n] for n in sorted(ref[2])]
        return [float((g - w).norm() / w.norm()) for g, w in zip(got, want)]

    loop = errors(step())
    me.install(model)
    _no_loop(monkeypatch)
    grouped = errors(step())
    assert all(g <= max(2 * e, 1e-2) for g, e in zip(grouped, loop)), (grouped, loop)
