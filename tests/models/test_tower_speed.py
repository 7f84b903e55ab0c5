"""The frozen tower's forward changes (qvl.models.tower_speed): the same values, the conv not run, cos / sin stored
once by inductor instead of recomputed in each consumer, and all of it undone."""

import pytest
import torch

from qvl.models import tower_speed
from qvl.models.load import load_model


def _tower(model, pixels, grid):
    with torch.no_grad():
        return model.model.visual(pixels, grid_thw=grid)


def test_linear_patch_embed_and_stored_rotary_give_the_same_tower_output(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    visual = model.model.visual
    torch.manual_seed(0)
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])  # an image and a two-frame video
    cfg = model.config.vision_config
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2)
    plain = _tower(model, pixels, grid)
    conv_calls = []
    hook = visual.patch_embed.proj.register_forward_hook(lambda *a: conv_calls.append(1))
    try:
        assert tower_speed.linear_patch_embed(visual) and tower_speed.stored_rotary(visual)
        fast = _tower(model, pixels, grid)
        assert not conv_calls, "the patch embedding still ran its Conv3d"
        tower_speed.restore(visual)
        assert "forward" not in visual.patch_embed.__dict__ and "forward" not in visual.rotary_pos_emb.__dict__
        _tower(model, pixels, grid)
        assert conv_calls
    finally:
        hook.remove()
        tower_speed.restore(visual)
    torch.testing.assert_close(fast.pooler_output, plain.pooler_output, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast.deepstack_features, plain.deepstack_features):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_patch_embed_only_for_a_patch_per_output():
    class Tower(torch.nn.Module):
        def __init__(self, stride):
            super().__init__()
            self.patch_embed = torch.nn.Module()
            self.patch_embed.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=stride)

    assert not tower_speed.linear_patch_embed(Tower((1, 2, 2)))  # overlapping windows: a real convolution
    assert tower_speed.linear_patch_embed(Tower((2, 4, 4)))


@pytest.mark.slow
def test_materialize_keeps_inductor_from_recomputing_a_value_per_consumer():
    """What stored_rotary relies on: inductor inlines a cheap elementwise value (cos) into every kernel that reads it
    across matmuls; through materialize it is computed once. Same results."""
    from torch._inductor.utils import run_and_get_code

    weight = torch.randn(8, 8)

    def blocks(cos, x):
        for _ in range(3):
            x = (x * cos) @ weight
        return x

    def inlined(pos, x):
        return blocks(pos.cos(), x)

    def stored(pos, x):
        return blocks(tower_speed.materialize(pos.cos()), x)

    pos, x = torch.randn(64, 8), torch.randn(64, 8)
    counts = {}
    for fn in (inlined, stored):
        torch._dynamo.reset()
        out, code = run_and_get_code(torch.compile(fn), pos, x)
        counts[fn.__name__] = "\n".join(code).count("cos(")
        torch.testing.assert_close(out, inlined(pos, x))
    assert counts["stored"] == 1 and counts["inlined"] > 1, counts
