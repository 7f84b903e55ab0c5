"""The vision tower's attention (one varlen call per block, or sdpa without cuDNN): same values, and the
function really runs."""

import pytest
import torch

from qvl.models import attention
from qvl.models.load import load_model


def _vision_out(model, pixel_values, grid):
    with torch.no_grad():
        out = model.model.visual(pixel_values, grid_thw=grid)
    return out.pooler_output if hasattr(out, "pooler_output") else out[0]


def test_vision_sdpa_same_values_and_used(tiny_model_dir, monkeypatch):
    from qvl.data.packing import varlen_available

    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    expected = attention.VISION_VARLEN if varlen_available() else attention.VISION_SDPA
    assert model.config.vision_config._attn_implementation == expected  # load_model applies it
    torch.manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])  # an image and a two-frame video: two sequence lengths
    patch = model.config.vision_config
    pixels = torch.randn(int(grid.prod(-1).sum()), patch.in_channels * patch.temporal_patch_size * patch.patch_size**2)
    calls = []
    original = attention.vision_sdpa_attention
    monkeypatch.setattr(attention, "vision_sdpa_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    attention.use_vision_sdpa(model, varlen=False)  # registers the patched function
    ours = _vision_out(model, pixels, grid)
    assert calls, "the vision attention did not go through qvl_vision_sdpa"
    calls.clear()
    attention.use_vision_sdpa(model, varlen=True)  # on CPU: the same sdpa per segment
    torch.testing.assert_close(_vision_out(model, pixels, grid), ours)
    assert len(calls) == 3 * model.config.vision_config.depth  # an image and two frames, per block
    model.config.vision_config._attn_implementation = "sdpa"
    plain = _vision_out(model, pixels, grid)
    torch.testing.assert_close(ours, plain)


def test_eager_vision_attention_is_left_alone(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    assert not attention.use_vision_sdpa(model)
    assert model.config.vision_config._attn_implementation == "eager"


def _fake_full_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=None, is_causal=None,
                      enable_gqa=False):
    """torch's varlen_attn contract on CPU, non-causal: (T, H, D) rows, full attention per segment of ``cu``."""
    import torch.nn.functional as F

    assert window_size == (-1, -1) or is_causal is False
    assert max_q == max(int(b - a) for a, b in zip(cu_q[:-1], cu_q[1:]))
    return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale)
                      .transpose(0, 1) for a, b in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:])])


@pytest.mark.parametrize("new_api", [True, False])
def test_vision_varlen_call_same_values(tiny_model_dir, monkeypatch, new_api):
    """The varlen path's layout and non-causal flag (both torch spellings), through transformers' flash branch of
    the vision attention (it hands over cu_seqlens and the longest segment): the tower's output equals sdpa's."""
    from qvl.data import packing

    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])
    patch = model.config.vision_config
    pixels = torch.randn(int(grid.prod(-1).sum()), patch.in_channels * patch.temporal_patch_size * patch.patch_size**2)
    model.config.vision_config._attn_implementation = "sdpa"
    plain = _vision_out(model, pixels, grid)
    calls = []
    fake = _fake_full_varlen if new_api else (lambda q, k, v, cq, ck, mq, mk, scale=None, is_causal=None:
                                              _fake_full_varlen(q, k, v, cq, ck, mq, mk, scale=scale,
                                                                is_causal=is_causal))
    spy = lambda *a, **k: calls.append(1) or fake(*a, **k)  # noqa: E731
    monkeypatch.setattr(packing, "_VARLEN", (spy if new_api else packing._grouped_heads(spy, False), new_api))
    monkeypatch.setattr(packing, "varlen_usable", lambda query, dropout: True)
    attention.use_vision_sdpa(model, varlen=True)
    torch.testing.assert_close(_vision_out(model, pixels, grid), plain)
    assert len(calls) == model.config.vision_config.depth  # one call per block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash kernel needs a GPU")
def test_vision_varlen_kernel_on_gpu(tiny_model_dir):
    from qvl.data.packing import varlen_available

    if not varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    model = load_model(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    torch.manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]], device="cuda")
    patch = model.config.vision_config
    pixels = torch.randn(int(grid.prod(-1).sum()), patch.in_channels * patch.temporal_patch_size * patch.patch_size**2,
                         device="cuda", dtype=torch.bfloat16)
    attention.use_vision_sdpa(model, varlen=True)
    ours = _vision_out(model, pixels, grid)
    model.config.vision_config._attn_implementation = "sdpa"
    plain = _vision_out(model, pixels, grid)
    torch.testing.assert_close(ours.float(), plain.float(), atol=3e-2, rtol=3e-2)
