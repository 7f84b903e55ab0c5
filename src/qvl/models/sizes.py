"""The facts of every Qwen3-VL size: one place, used by model builders, the planner and benchmarks.

Values are transcriptions of the official ``config.json`` files (see
``shared/reference/transformers_qwen3vl.md`` §3). Parameter counts were measured by
instantiating each architecture on the meta device with transformers 5.24 (tied weights
counted once); ``tests/models/test_sizes.py`` re-derives them from the configs so the table
cannot drift from the code that builds the models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Shared by every size (official configs).
HEAD_DIM = 128
VOCAB_SIZE = 151936
ROPE_THETA = 5_000_000.0
MROPE_SECTION = (24, 20, 20)
MAX_POSITION_EMBEDDINGS = 262_144
RMS_NORM_EPS = 1e-6

VISION_PATCH_SIZE = 16
VISION_SPATIAL_MERGE = 2
VISION_TEMPORAL_PATCH = 2
VISION_NUM_HEADS = 16
VISION_NUM_POSITION_EMBEDDINGS = 2304  # a 48x48 grid of learned position embeddings


@dataclass(frozen=True)
class MoEFacts:
    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int


@dataclass(frozen=True)
class SizeFacts:
    """One Qwen3-VL size. Counts are in parameters; tied lm_head is counted once."""

    name: str
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    tie_word_embeddings: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    deepstack_indexes: tuple[int, ...]
    moe: MoEFacts | None = None
    # Measured parameter counts (meta device), used by the planner.
    params_total: int = 0
    params_vision: int = 0  # vision tower incl. merger and DeepStack mergers
    params_embed: int = 0
    params_active: int | None = None  # per token, MoE only
    hub_ids: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def model_type(self) -> str:
        return "qwen3_vl_moe" if self.is_moe else "qwen3_vl"

    @property
    def params_lm_head(self) -> int:
        return 0 if self.tie_word_embeddings else self.params_embed

    @property
    def params_llm_body(self) -> int:
        """LLM parameters without embeddings and lm_head (the 'non-embedding' count)."""
        return self.params_total - self.params_vision - self.params_embed - self.params_lm_head

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes for one token of context: K and V for every layer."""
        return 2 * self.text_layers * self.text_kv_heads * HEAD_DIM * dtype_bytes

    def text_config(self) -> dict:
        cfg = {
            "vocab_size": VOCAB_SIZE,
            "hidden_size": self.text_hidden,
            "intermediate_size": self.text_intermediate,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "num_key_value_heads": self.text_kv_heads,
            "head_dim": HEAD_DIM,
            "hidden_act": "silu",
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "rms_norm_eps": RMS_NORM_EPS,
            "attention_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": ROPE_THETA,
                "mrope_section": list(MROPE_SECTION),
                "mrope_interleaved": True,
            },
        }
        if self.moe is not None:
            cfg.update(
                num_experts=self.moe.num_experts,
                num_experts_per_tok=self.moe.experts_per_token,
                moe_intermediate_size=self.moe.moe_intermediate_size,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        return cfg

    def vision_config(self) -> dict:
        return {
            "depth": self.vision_depth,
            "hidden_size": self.vision_hidden,
            "intermediate_size": self.vision_intermediate,
            "num_heads": VISION_NUM_HEADS,
            "in_channels": 3,
            "patch_size": VISION_PATCH_SIZE,
            "spatial_merge_size": VISION_SPATIAL_MERGE,
            "temporal_patch_size": VISION_TEMPORAL_PATCH,
            "out_hidden_size": self.text_hidden,
            "num_position_embeddings": VISION_NUM_POSITION_EMBEDDINGS,
            "deepstack_visual_indexes": list(self.deepstack_indexes),
            "hidden_act": "gelu_pytorch_tanh",
        }


def _hub(size: str) -> tuple[str, ...]:
    return (f"Qwen/Qwen3-VL-{size}-Instruct", f"Qwen/Qwen3-VL-{size}-Thinking")


SIZES: dict[str, SizeFacts] = {
    "2B": SizeFacts(
        "2B", 2048, 28, 16, 8, 6144, True, 24, 1024, 4096, (5, 11, 17),
        params_total=2_127_532_032, params_vision=406_957_056, params_embed=311_164_928,
        hub_ids=_hub("2B"),
    ),
    "4B": SizeFacts(
        "4B", 2560, 36, 32, 8, 9728, True, 24, 1024, 4096, (5, 11, 17),
        params_total=4_437_815_808, params_vision=415_347_712, params_embed=388_956_160,
        hub_ids=_hub("4B"),
    ),
    "8B": SizeFacts(
        "8B", 4096, 36, 32, 8, 12288, False, 27, 1152, 4304, (8, 16, 24),
        params_total=8_767_123_696, params_vision=576_388_336, params_embed=622_329_856,
        hub_ids=_hub("8B"),
    ),
    "32B": SizeFacts(
        "32B", 5120, 64, 64, 8, 25600, False, 27, 1152, 4304, (8, 16, 24),
        params_total=33_357_390_064, params_vision=595_266_800, params_embed=777_912_320,
        hub_ids=_hub("32B"),
    ),
    "30B-A3B": SizeFacts(
        "30B-A3B", 2048, 48, 32, 4, 6144, False, 27, 1152, 4304, (8, 16, 24),
        moe=MoEFacts(128, 8, 768),
        params_total=31_070_754_032, params_vision=538_631_408, params_embed=311_164_928,
        params_active=3_891_664_112,
        hub_ids=_hub("30B-A3B"),
    ),
    "235B-A22B": SizeFacts(
        "235B-A22B", 4096, 94, 64, 4, 12288, False, 27, 1152, 4304, (8, 16, 24),
        moe=MoEFacts(128, 8, 1536),
        params_total=235_670_022_896, params_vision=576_388_336, params_embed=622_329_856,
        params_active=22_767_151_856,
        hub_ids=_hub("235B-A22B"),
    ),
}


def get_size(name: str) -> SizeFacts:
    """Look a size up by name ('8B'), hub id ('Qwen/Qwen3-VL-8B-Instruct') or case variant."""
    key = name.strip()
    for size in SIZES.values():
        if key.upper() == size.name.upper() or key in size.hub_ids:
            return size
        if key.lower().rstrip("/").endswith(("qwen3-vl-" + size.name).lower() + "-instruct"):
            return size
        if key.lower().rstrip("/").endswith(("qwen3-vl-" + size.name).lower() + "-thinking"):
            return size
    known = ", ".join(SIZES)
    raise KeyError(f"unknown Qwen3-VL size {name!r}; known sizes: {known}")
