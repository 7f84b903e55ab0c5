"""Build Qwen3-VL checkpoints offline: the tiny test model and official architectures with random weights.

Nothing here downloads. A checkpoint is: config (from ``sizes`` or the tiny spec), random
weights, a byte-level BPE tokenizer with Qwen's added tokens in Qwen's order, our ChatML
template, and the real ``Qwen2VLImageProcessor`` / ``Qwen3VLVideoProcessor``. Builds are
deterministic: the same arguments give byte-identical folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qvl.errors import QvlError
from qvl.models import tokens as T
from qvl.models.sizes import SizeFacts, get_size

# Official hub processor budgets (preprocessor_config.json / video_preprocessor_config.json).
OFFICIAL_IMAGE_SIZE = {"shortest_edge": 65_536, "longest_edge": 16_777_216}
OFFICIAL_VIDEO_SIZE = {"shortest_edge": 4_096, "longest_edge": 25_165_824}

# The tiny model's own budgets: small images keep CPU tests fast (4..256 visual tokens).
TINY_IMAGE_SIZE = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 256}
TINY_VIDEO_SIZE = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 2 * 256}

TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [4, 2, 2],  # must sum to head_dim / 2
        "mrope_interleaved": True,
    },
}
TINY_VISION = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 4,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [0, 1],  # < depth, and no more than the LLM layer count
    "hidden_act": "gelu_pytorch_tanh",
}

# A slightly larger tiny variant for `qvl demo` (still random weights, ~2 M parameters): wide
# enough to learn the demo's colour and shape questions from scratch on a CPU in about a minute.
# The default tiny model above stays as it is (tests pin its bytes).
TINY_DEMO_TEXT = dict(
    TINY_TEXT,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope_parameters=dict(TINY_TEXT["rope_parameters"], mrope_section=[6, 5, 5]),  # sums to head_dim / 2
)
TINY_DEMO_VISION = dict(
    TINY_VISION,
    depth=2,
    hidden_size=128,
    intermediate_size=256,
    num_heads=4,
    out_hidden_size=128,
    deepstack_visual_indexes=[0, 1],
)
# A tiny mixture-of-experts language model (the 30B-A3B / 235B-A22B architecture, qwen3_vl_moe):
# every layer sparse, 4 experts, 2 per token.
TINY_MOE_TEXT = dict(TINY_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
TINY_VARIANTS = {"default": (TINY_TEXT, TINY_VISION), "demo": (TINY_DEMO_TEXT, TINY_DEMO_VISION),
                 "moe": (TINY_MOE_TEXT, TINY_VISION)}

# Words the tiny tokenizer learns merges for: chat, the synthetic datasets, grounding JSON.
_CORPUS_WORDS = (
    "the a an is are what which where how many of in on at to and or with this that image video picture "
    "frame frames shape shapes colour color red green blue yellow purple orange white black gray "
    "circle square triangle rectangle star one two three four five six seven eight nine ten zero "
    "there answer question describe locate find box boxes object objects count left right top bottom "
    "center moving moves first last second seconds time you assistant user system hello yes no "
    "please word only json bbox_2d point_2d label Report coordinates format Locate every instance"
)


@dataclass(frozen=True)
class Built:
    path: Path
    num_params: int


def chat_template() -> str:
    return resources.files("qvl.models").joinpath("chat_template.jinja").read_text()


def _corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = []
    for i, w in enumerate(words):
        nxt = words[(i * 7 + 3) % len(words)]
        lines.append(f"{w} {nxt}, {i} {i * 13 % 1000}: [{i % 10}, {i * 37 % 1000}]\n")
        lines.append(f'{{"bbox_2d": [{i * 3 % 1000}, {i * 11 % 1000}], "label": "{w}"}}')
    return lines * 4


def build_tokenizer(pad_regular_vocab_to: int | None = None, vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Qwen's pre-tokenizer and added tokens in Qwen's order.

    ``pad_regular_vocab_to`` fills the regular vocabulary with unreachable filler entries so
    that the added tokens land on the official ids (151643...).
    """
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    if pad_regular_vocab_to is not None:
        if pad_regular_vocab_to < len(vocab):
            raise ValueError(f"cannot pad a vocabulary of {len(vocab)} down to {pad_regular_vocab_to}")
        for i in range(len(vocab), pad_regular_vocab_to):
            vocab[f"<|qvl_unused_{i}|>"] = i  # no merge produces these: they are never emitted

    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None,
        eos_token=T.ENDOFTEXT, pad_token=T.ENDOFTEXT,
    )
    specials = [t for t, special in T.ADDED_TOKENS if special]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([t for t, special in T.ADDED_TOKENS if not special])
    # Set eos only now: passing it to the constructor would insert <|im_end|> before
    # <|endoftext|> and break Qwen's id order.
    tok.eos_token = T.IM_END
    tok.chat_template = chat_template()
    first = tok.convert_tokens_to_ids(T.ENDOFTEXT)
    for i, (text, _) in enumerate(T.ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(text) == first + i, f"{text} is out of Qwen's order"
    return tok


def build_processor(tokenizer, image_size: dict, video_size: dict):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor = Qwen2VLImageProcessor(size=dict(image_size), **common)
    video_processor = Qwen3VLVideoProcessor(
        size=dict(video_size), fps=2, min_frames=4, max_frames=768, cap_pixels_per_frame=True, **common
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=chat_template(),
    )


def build_config(text: dict, vision: dict, tokenizer, tie_word_embeddings: bool, moe: bool, vocab_size: int):
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    ids = T.token_ids(tokenizer)
    text = dict(text, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                bos_token_id=ids.endoftext, eos_token_id=ids.im_end, pad_token_id=ids.pad)
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(
        text_config=text,
        vision_config=dict(vision),
        image_token_id=ids.image_pad,
        video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start,
        vision_end_token_id=ids.vision_end,
        tie_word_embeddings=tie_word_embeddings,
    )


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    ids = T.token_ids(tokenizer)
    # Qwen3-VL Instruct sampling recommendations; presence_penalty is applied by qvl's samplers.
    return GenerationConfig(
        eos_token_id=[ids.im_end, ids.endoftext], pad_token_id=ids.pad, bos_token_id=ids.endoftext,
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
    )


def instantiate(config, seed: int = 0, dtype=None, device=None):
    """Random-weight model for ``config`` (dense or MoE class chosen from model_type)."""
    import torch

    from qvl.models.load import model_class

    cls = model_class(config.model_type)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls(config)
    return model.eval()


def _save(model, processor, out: Path) -> None:
    from qvl.utils.fs import atomic_dir

    with atomic_dir(out) as tmp:
        # 5 GB shards: transformers' default (50 GB) holds a whole shard's bytes in host memory while writing it
        # (30B-A3B: a 50 GB shard, which a 64 GB machine writing to /dev/shm cannot hold twice)
        model.save_pretrained(tmp, max_shard_size="5GB")
        processor.save_pretrained(tmp)
        for f in tmp.iterdir():  # safetensors writes 0600; checkpoints are meant to be shared
            os.chmod(f, 0o644)


def tiny_parts(seed: int = 0, variant: str = "default"):
    if variant not in TINY_VARIANTS:
        raise QvlError(f"unknown tiny variant {variant!r}", fix=f"use one of: {', '.join(TINY_VARIANTS)}")
    text, vision = TINY_VARIANTS[variant]
    tok = build_tokenizer()
    processor = build_processor(tok, TINY_IMAGE_SIZE, TINY_VIDEO_SIZE)
    vocab = len(tok)
    config = build_config(text, vision, tok, tie_word_embeddings=False, moe=variant == "moe", vocab_size=vocab)
    model = instantiate(config, seed=seed)
    model.generation_config = _generation_config(tok)
    return model, processor


def build_tiny(out: str | os.PathLike, seed: int = 0, variant: str = "default") -> Built:
    """The tiny random-weight checkpoint; ``variant="demo"`` is the wider one `qvl demo` trains, ``"moe"`` the
    mixture-of-experts architecture."""
    model, processor = tiny_parts(seed, variant)
    _save(model, processor, Path(out))
    return Built(Path(out), sum(p.numel() for p in model.parameters()))


def official_processor():
    """A processor whose token ids and budgets match the official Qwen3-VL checkpoints."""
    tok = build_tokenizer(pad_regular_vocab_to=T.OFFICIAL_FIRST_ADDED_ID)
    for text, official in T.OFFICIAL_IDS.items():
        assert tok.convert_tokens_to_ids(text) == official
    return build_processor(tok, OFFICIAL_IMAGE_SIZE, OFFICIAL_VIDEO_SIZE)


def official_config(size: str | SizeFacts, processor=None):
    facts = get_size(size) if isinstance(size, str) else size
    processor = processor or official_processor()
    from qvl.models.sizes import VOCAB_SIZE

    return build_config(
        facts.text_config(), facts.vision_config(), processor.tokenizer,
        tie_word_embeddings=facts.tie_word_embeddings, moe=facts.is_moe, vocab_size=VOCAB_SIZE,
    )


def random_model(size: str, dtype=None, device=None, seed: int = 0):
    """An official architecture with random weights, in memory (for benchmarks on the GPU)."""
    processor = official_processor()
    model = instantiate(official_config(size, processor), seed=seed, dtype=dtype, device=device)
    model.generation_config = _generation_config(processor.tokenizer)
    return model, processor


def build_random(size: str, out: str | os.PathLike, dtype=None, seed: int = 0, device=None) -> Built:
    """Write an official architecture with random weights. Initialising on a GPU when there is one is
    ~30x faster than on the CPU (8B: seconds instead of ~7 minutes); the weights are written from there."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = random_model(size, dtype=dtype, seed=seed, device=device)
    _save(model, processor, Path(out))
    return Built(Path(out), sum(p.numel() for p in model.parameters()))


def default_tiny_dir():
    """The embedded default model: the tiny checkpoint, built once into the qvl cache folder."""
    from qvl.utils.fs import cache_dir

    out = cache_dir() / "models" / "tiny"
    if not (out / "config.json").is_file():
        try:
            build_tiny(out)
        except QvlError:  # another process built it first
            if not (out / "config.json").is_file():
                raise
    return out
