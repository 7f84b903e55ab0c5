"""Packed rows compute what each sample computes alone: per-sample loss and gradients."""

import pytest
import torch

from helpers import write_image, write_video
from qvl.config.vision import VisionBudget
from qvl.data.collate import collate
from qvl.data.packing import best_fit_decreasing, model_inputs, pack, rope_index_fn, use_packed_attention
from qvl.data.preprocess import IGNORE_INDEX, encode
from qvl.data.samples import parse_sample
from qvl.models.load import load


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("mixed")
    write_image(d / "a.png", 200, 120, (200, 20, 20))
    write_image(d / "b.png", 96, 160, (20, 200, 20))
    write_video(d / "v.mp4", frames=16, fps=8)
    q = lambda tag, a: [{"from": "human", "value": f"{tag}question?"}, {"from": "gpt", "value": a}]  # noqa: E731
    raws = [
        {"conversations": q("", "just text")},
        {"image": "a.png", "conversations": q("<image>", "red")},
        {"image": ["a.png", "b.png"], "conversations": q("<image><image>", "two images")},
        {"video": "v.mp4", "conversations": q("<video>", "it gets brighter")},
    ]
    _, processor = load(tiny_model_dir)
    encs = [encode(parse_sample(r, i, d)[0], processor, VisionBudget()) for i, r in enumerate(raws)]
    return encs, processor


def _per_sample_loss(logits, labels):
    """Sum of next-token losses over label tokens (same shift as the model's loss)."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE_INDEX,
                                             reduction="sum")


def _alone(model, processor, encs):
    losses, grads = [], None
    model.zero_grad()
    for e in encs:
        batch = collate([e], processor.tokenizer.pad_token_id)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        loss = _per_sample_loss(logits, batch["labels"])
        loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def _packed(model, encs):
    model.zero_grad()
    batch = pack(encs, rope_index_fn(model))
    logits = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
    losses, start = [], 0
    for n in batch["seq_lens"]:
        losses.append(_per_sample_loss(logits[:, start:start + n], batch["labels"][:, start:start + n]))
        start += n
    torch.stack(losses).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [x.item() for x in losses], grads


def test_packed_equals_alone_sdpa(mixed, tiny_model_dir):
    encs, processor = mixed
    model, _ = load(tiny_model_dir)
    model.train()
    ref_losses, ref_grads = _alone(model, processor, encs)
    losses, grads = _packed(model, encs)
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-4)
    assert set(grads) == set(ref_grads)
    worst = max((grads[n] - ref_grads[n]).abs().max().item() / (ref_grads[n].abs().max().item() + 1e-8) for n in grads)
    assert worst < 1e-3, worst


@pytest.mark.slow
def test_packed_equals_alone_flex_forward(mixed, tiny_model_dir):
    """The block-sparse path gives the same per-sample losses. (Flex backward needs a GPU: bench/ covers it.)"""
    encs, processor = mixed
    model, _ = load(tiny_model_dir)
    with torch.no_grad():
        ref = [_per_sample_loss(model(**{k: v for k, v in collate([e], processor.tokenizer.pad_token_id).items()
                                         if k != "labels"}, use_cache=False).logits, e.labels[None]).item()
               for e in encs]
        assert use_packed_attention(model, "flex") == "qvl_flex"
        batch = pack(encs, rope_index_fn(model))
        logits = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
    losses, start = [], 0
    for n in batch["seq_lens"]:
        losses.append(_per_sample_loss(logits[:, start:start + n], batch["labels"][:, start:start + n]).item())
        start += n
    assert losses == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_cache_left_on_leaks_across_samples(mixed, tiny_model_dir):
    """Why pack() sets use_cache=False: with the cache on, sample 2 sees sample 1."""
    encs, processor = mixed
    model, _ = load(tiny_model_dir)
    batch = model_inputs(pack(encs[:2], rope_index_fn(model)))
    batch.pop("labels")
    good = model(**batch).logits
    batch["use_cache"] = True
    leaky = model(**batch).logits
    n0 = len(encs[0])
    assert torch.allclose(good[:, :n0], leaky[:, :n0], atol=1e-5)
    assert not torch.allclose(good[:, n0:], leaky[:, n0:], atol=1e-3)


def test_first_token_of_each_sample_is_not_a_label(mixed, tiny_model_dir):
    encs, _ = mixed
    model, _ = load(tiny_model_dir)
    batch = pack(encs, rope_index_fn(model))
    start = 0
    for n in batch["seq_lens"]:
        assert batch["labels"][0, start] == IGNORE_INDEX
        assert batch["position_ids"][0, 0, start] == 0
        start += n
    assert batch["position_ids"].shape == (4, 1, sum(batch["seq_lens"]))


def test_best_fit_decreasing():
    lengths = [900, 100, 500, 500, 300, 200, 1200, 700, 50]
    plan = best_fit_decreasing(lengths, 1000)
    assert plan.too_long == [6]
    placed = sorted(i for p in plan.packs for i in p)
    assert placed == [0, 1, 2, 3, 4, 5, 7, 8]  # every sample exactly once
    assert all(sum(lengths[i] for i in p) <= 1000 for p in plan.packs)
    assert len(plan.packs) == 4  # 3,250 tokens need at least 4 bins of 1,000
    assert plan.fill_ratio == pytest.approx(3250 / 4000)


def test_packed_equals_alone_per_sample(mixed, tiny_model_dir):
    """qvl_per_sample (sdpa on each sample's slice, no mask): same per-sample losses and gradients as alone."""
    from qvl.data import packing

    encs, processor = mixed
    model, _ = load(tiny_model_dir)
    model.train()
    ref_losses, ref_grads = _alone(model, processor, encs)
    assert use_packed_attention(model, "per_sample") == "qvl_per_sample"
    calls = []
    original = packing._cached_bounds
    packing._cached_bounds = lambda t: calls.append(1) or original(t)
    try:
        losses, grads = _packed(model, encs)
    finally:
        packing._cached_bounds = original
    assert calls, "the per-sample attention did not run"
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-4)
    assert set(grads) == set(ref_grads)
    worst = max((grads[n] - ref_grads[n]).abs().max().item() / (ref_grads[n].abs().max().item() + 1e-8) for n in grads)
    assert worst < 1e-3, worst


def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=None, is_causal=None,
                 enable_gqa=False):
    """torch's varlen_attn contract, on CPU: (T, H, D) rows, causal per segment of ``cu``."""
    import torch.nn.functional as F

    assert window_size == (-1, 0) or is_causal is True
    assert enable_gqa or k.shape[1] == q.shape[1]
    assert max_q == max(int(b - a) for a, b in zip(cu_q[:-1], cu_q[1:]))
    outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scale,
                                           enable_gqa=enable_gqa).transpose(0, 1) for a, b in zip(cu_q[:-1], cu_q[1:])]
    return torch.cat(outs)


@pytest.mark.parametrize("api", ["enable_gqa", "older", "older_with_grad"])
def test_varlen_call_matches_per_sample_sdpa(monkeypatch, api):
    """The varlen call's layout, causal flag and GQA handling, against the sdpa loop. On a torch whose varlen_attn has
    no ``enable_gqa`` (2.10, 2.11: no window either), grouped heads go to the flash kernel itself, with gradients
    too (the op's backward sums each group's key / value gradients); equal heads stay with varlen_attn."""
    from qvl.data import packing

    torch.manual_seed(0)
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2])
    grad = api == "older_with_grad"
    q = torch.randn(1, 4, 9, 8, requires_grad=grad)
    k, v = (torch.randn(1, 2, 9, 8, requires_grad=grad) for _ in range(2))  # 2 KV heads for 4 query heads
    ref, _ = packing.per_sample_attention(None, q, k, v, None, scaling=0.3, position_ids=pos)
    calls = []

    def older(q, k, v, cq, ck, mq, mk, scale=None, is_causal=None):  # asserts the heads are equal
        calls.append("varlen_attn")
        return _fake_varlen(q, k, v, cq, ck, mq, mk, scale=scale, is_causal=is_causal)

    def flash(q, k, v, cq, ck, mq, mk, dropout, causal, debug_mask, scale=None):  # aten's flash op, grouped heads
        assert dropout == 0.0 and not debug_mask and k.shape[1] < q.shape[1]
        calls.append("flash")
        return (_fake_varlen(q, k, v, cq, ck, mq, mk, scale=scale, is_causal=causal, enable_gqa=True),)

    monkeypatch.setattr(packing, "_flash_forward", flash)
    varlen = (_fake_varlen, True) if api == "enable_gqa" else (packing._grouped_heads(older, False), False)
    monkeypatch.setattr(packing, "_VARLEN", varlen)
    bounds, cu = packing._cached_bounds(pos)
    out = packing.varlen_causal(q, k, v, cu, max(e - s for s, e in bounds), scaling=0.3)
    assert out.shape == ref.shape == (1, 9, 4, 8)
    torch.testing.assert_close(out, ref)
    assert calls == {"enable_gqa": [], "older": ["flash"], "older_with_grad": ["flash"]}[api]
    if grad:  # the key / value gradients come back in their own (grouped) heads' shape
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
            assert g.shape == r.shape
            torch.testing.assert_close(g, r)
    if api != "enable_gqa":  # equal heads: varlen_attn as it is
        full = torch.randn(1, 4, 9, 8)
        packing.varlen_causal(full, full, full, cu, max(e - s for s, e in bounds), scaling=0.3)
        assert calls[-1] == "varlen_attn"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash kernel needs a GPU")
def test_varlen_kernel_matches_sdpa_on_gpu():
    from qvl.data import packing

    if packing._VARLEN is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], device="cuda")
    q = torch.randn(1, 8, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = packing.per_sample_attention(None, q, k, v, None, position_ids=pos)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    bounds = packing.sample_bounds(pos)
    import torch.nn.functional as F

    ref = torch.cat([F.scaled_dot_product_attention(*(t[:, :, s:e].float() for t in (q, k, v)), is_causal=True,
                                                    enable_gqa=True) for s, e in bounds], dim=2).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    with torch.no_grad():  # inference: on torch 2.10 / 2.11 the grouped heads go to flash as they are
        torch.testing.assert_close(packing.per_sample_attention(None, q, k, v, None, position_ids=pos)[0], out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=5e-2)
    # compiled (inductor) with the bounds as inputs, as compile_layers runs it: the same values and gradients
    compiled = torch.compile(packing.per_sample_attention, dynamic=True, fullgraph=True)
    out_c, _ = compiled(None, q, k, v, None, position_ids=pos, **packing.sample_bounds_inputs(pos[None]))
    torch.testing.assert_close(out_c, out)
    for g, r in zip(torch.autograd.grad(out_c.float().square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(g, r)


def test_sample_bounds_are_cached_per_tensor():
    from qvl.data.packing import sample_bounds

    pos = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])
    assert sample_bounds(pos) == [(0, 3), (3, 5), (5, 9)]
    assert sample_bounds(pos) is sample_bounds(pos)
    other = torch.tensor([0, 1, 0, 1, 2, 3, 4, 5, 6])  # a new forward's positions: never the cached answer
    assert sample_bounds(other) == [(0, 2), (2, 9)]
    assert sample_bounds(torch.tensor([[0, 1, 2]])) == [(0, 3)]


def test_bounds_as_inputs_match_bounds_from_positions():
    """per_sample attention with the bounds handed in (sample_bounds_inputs) equals the path that reads them from
    position_ids, eager and through the traceable block-diagonal mask used while compiling."""
    from qvl.data import packing

    torch.manual_seed(0)
    lens = [5, 1, 9, 3]
    pos = torch.cat([torch.arange(n) for n in lens])
    positions = torch.stack([pos, pos, pos, pos])[:, None, :]  # (4, 1, L) as pack() makes them
    q = torch.randn(1, 4, sum(lens), 8)
    k, v = torch.randn(2, 1, 2, sum(lens), 8).unbind(0)  # GQA: 2 KV heads for 4 query heads
    ref, _ = packing.per_sample_attention(None, q, k, v, None, scaling=0.3, position_ids=pos[None])
    inputs = packing.sample_bounds_inputs(positions)
    assert inputs["qvl_cu_seqlens"].tolist() == [0, 5, 6, 15, 18] and inputs["qvl_max_seqlen"] == 9
    eager, _ = packing.per_sample_attention(None, q, k, v, None, scaling=0.3, **inputs)
    masked = packing.masked_causal(q, k, v, inputs["qvl_cu_seqlens"], scaling=0.3)
    assert torch.allclose(eager, ref, atol=1e-6) and torch.allclose(masked, ref, atol=1e-5)
    compiled = torch.compile(packing.per_sample_attention, backend="aot_eager", fullgraph=True)
    out, _ = compiled(None, q, k, v, None, scaling=0.3, position_ids=pos[None], **inputs)
    assert torch.allclose(out, ref, atol=1e-5)


def test_rope_index_without_the_model_pickles_and_equals_the_models(mixed, tiny_model_dir):
    """RopeIndex (class + config) gives the positions the model's own get_rope_index gives, and survives pickling
    (DataLoader workers compute positions with it); pack uses positions a sample already carries."""
    import pickle

    import dataclasses

    from qvl.data.packing import RopeIndex, sample_positions

    model, _ = load(tiny_model_dir)
    portable = pickle.loads(pickle.dumps(RopeIndex(model)))
    encs = [dataclasses.replace(e) for e in mixed[0]]
    for enc in encs:
        assert torch.equal(sample_positions(enc, portable), sample_positions(enc, rope_index_fn(model)))
    ref = pack(encs, rope_index_fn(model))
    for enc in encs:
        enc.positions = sample_positions(enc, portable)
    got = pack(encs, lambda *a: (_ for _ in ()).throw(AssertionError("positions were given")))
    assert torch.equal(got["position_ids"], ref["position_ids"])
