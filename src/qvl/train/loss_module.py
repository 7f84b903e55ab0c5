"""The loss a training step minimises: the model's forward over one micro-batch and its token-weighted loss.

:class:`LossModule` is what the engine (one GPU, DDP, DeepSpeed, FSDP2) calls with a batch. It computes logits only
where a label is (optionally through :func:`qvl.train.loss_head.linear_cross_entropy`, no full-vocabulary logits
tensor), takes a packed row's host-side facts (:mod:`qvl.train.row_forward`) and keeps the vision tower in every
step's graph when it trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qvl.data.preprocess import IGNORE_INDEX
from qvl.train import loss_head


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict) or hasattr(obj, "values") and callable(obj.values):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class LossModule(torch.nn.Module):
    """``forward(batch, n_label_tokens)`` -> (sum of per-token losses / n_label_tokens, sum of losses).

    Logits are computed only where a label is (the lm_head over prompt and image tokens is
    skipped), in float32. When a micro-batch has no pixels but the vision tower has trainable
    weights, the tower runs on a 4-patch dummy input and 0 x its outputs joins the loss: every
    trainable weight gets a (zero) gradient, so DDP / ZeRO ranks never wait for one that has none.
    """

    def __init__(self, model, fused_cross_entropy: bool = False, bounds_as_inputs: bool = False,
                 row_bound: bool = False, graphs=None):
        super().__init__()
        self.model = model  # Qwen3VLForConditionalGeneration or a PeftModel around it
        self.fused_ce = fused_cross_entropy  # loss_head.linear_cross_entropy: no full-vocabulary logits tensor
        # per_sample attention: a packed row's sample bounds read once here and handed to every layer as
        # kwargs (no host read inside the layers, which lets compile_layers compile whole attention modules)
        self.bounds_as_inputs = bounds_as_inputs
        self.row_bound = row_bound  # the longest sample given as the row's length (CUDA graphs: fixed per length)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.inner, self.lm_head, self.visual = base.model, base.lm_head, base.model.visual
        from qvl.train import row_forward

        # packed rows with their host-side facts made when packed (row_forward.row_extras): no host read per step
        self.config, self.row_forward = base.config, row_forward.usable(self.inner, base.config)
        self.graphs = graphs  # qvl.train.graphs.DecoderGraphs (cuda_graphs), set by the loop
        self.gemm_row_multiple = 0  # the fused loss head's rows padded to a multiple (gemm_row_multiple)
        # matmul shapes met so far (gemm_row_multiple on a GPU): the first time cuBLAS meets one it holds the host
        # until the GPU is idle, so a step that meets new ones is a warm-up step (WarmUpEvents)
        self.shapes_met: set = set()
        self.vision_trains = any(p.requires_grad for p in self.visual.parameters())
        vc = base.config.vision_config
        self.patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        self.merge = vc.spatial_merge_size

    def fused_head(self) -> bool:
        """The loss head runs as :func:`loss_head.linear_cross_entropy` (a plain Linear only: a LoRA-wrapped lm_head,
        lora_target_regex, would lose its adapter's output)."""
        return self.fused_ce and type(self.lm_head) is torch.nn.Linear and self.lm_head.bias is None

    def warm_gemm_shapes(self, row_tokens: int, media: bool) -> tuple[int, int]:
        """``gemm_row_multiple``: meet every loss-head and (``media``: padded on the packed-row path, frozen) tower
        matmul shape rows of up to ``row_tokens`` tokens can make, before training, under the step's autocast.
        Returns (loss-head shapes, tower patch counts)."""
        from qvl.train.row_forward import warm_tower

        multiple = self.gemm_row_multiple
        head = loss_head.warm_loss_head(self.lm_head.weight, multiple, row_tokens) if self.fused_head() else 0
        tower = 0
        if media and not self.vision_trains:  # a row's patches: at most merge^2 per token
            tower = warm_tower(self.visual, self.config.vision_config, self.merge ** 2 * row_tokens, multiple,
                               self.lm_head.weight.device)
        return head, tower

    def dummy_vision(self, device, dtype) -> torch.Tensor:
        m = self.merge
        pixels = torch.zeros(m * m, self.patch_dim, device=device, dtype=dtype)
        grid = torch.tensor([[1, m, m]], device=device)
        out = self.visual(pixels, grid_thw=grid)
        return sum(t.float().sum() for t in _tensors(out) if t.is_floating_point()) * 0.0

    def forward(self, batch: dict, n_label_tokens: float):
        from qvl.train.row_forward import row_hidden, take_extras

        labels = batch.pop("labels")
        batch.pop("padding", None)  # pack_micro_batch's count of padding tokens (they have no labels)
        watch = self.gemm_row_multiple and labels.is_cuda
        if watch:
            self.shapes_met.update((key, batch[key].shape[0]) for key in ("pixel_values", "pixel_values_videos")
                                   if key in batch)
        extras = take_extras(batch)  # pack_micro_batch's host-side facts (row_forward.row_extras)
        positions = batch.get("position_ids")
        packed_row = positions is not None and positions.dim() == 3 and positions.shape[:2] == (4, 1)
        if self.bounds_as_inputs and packed_row and extras and self.row_forward:
            last = row_hidden(self.inner, self.config, batch, extras, self.row_bound, self.graphs)
        else:
            extra = {}
            if self.bounds_as_inputs and packed_row:
                from qvl.data.packing import sample_bounds_inputs

                extra = sample_bounds_inputs(batch["position_ids"], row_bound=self.row_bound)
            last = self.inner(**batch, **extra, use_cache=False).last_hidden_state
        hidden, target = last[:, :-1], labels[:, 1:]
        if "label_index" in extras:  # positions found on the CPU: no host read of a boolean mask's count
            index = extras["label_index"]
            hidden, target = hidden[0].index_select(0, index), target[0].index_select(0, index)
        else:
            keep = target != IGNORE_INDEX
            hidden, target = hidden[keep], target[keep]
        if watch:
            self.shapes_met.add(("loss head", loss_head.gemm_rows(target.numel(), self.gemm_row_multiple)))
        if self.fused_head():
            loss_sum = loss_head.linear_cross_entropy(hidden, self.lm_head.weight, target,
                                                      row_multiple=self.gemm_row_multiple)
        else:
            logits = self.lm_head(hidden).float()
            loss_sum = F.cross_entropy(logits, target, reduction="sum")
        loss = loss_sum / max(n_label_tokens, 1.0)
        if self.vision_trains and "pixel_values" not in batch and "pixel_values_videos" not in batch:
            loss = loss + self.dummy_vision(hidden.device, self.visual.dtype if hasattr(self.visual, "dtype")
                                            else next(self.visual.parameters()).dtype)
        return loss, loss_sum.detach()
