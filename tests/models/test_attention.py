"""The vision tower's sdpa without cuDNN: same values, and the function really runs."""

import torch

from qvl.models import attention
from qvl.models.load import load_model


def _vision_out(model, pixel_values, grid):
    with torch.no_grad():
        out = model.model.visual(pixel_values, grid_thw=grid)
    return out.pooler_output if hasattr(out, "pooler_output") else out[0]


def test_vision_sdpa_same_values_and_used(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    assert model.config.vision_config._attn_implementation == attention.VISION_SDPA  # load_model applies it
    torch.manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])  # an image and a two-frame video: two sequence lengths
    patch = model.config.vision_config
    pixels = torch.randn(int(grid.prod(-1).sum()), patch.in_channels * patch.temporal_patch_size * patch.patch_size**2)
    calls = []
    original = attention.vision_sdpa_attention
    monkeypatch.setattr(attention, "vision_sdpa_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    attention.use_vision_sdpa(model)  # registers the patched function
    ours = _vision_out(model, pixels, grid)
    assert calls, "the vision attention did not go through qvl_vision_sdpa"
    model.config.vision_config._attn_implementation = "sdpa"
    plain = _vision_out(model, pixels, grid)
    torch.testing.assert_close(ours, plain)


def test_eager_vision_attention_is_left_alone(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    assert not attention.use_vision_sdpa(model)
    assert model.config.vision_config._attn_implementation == "eager"
