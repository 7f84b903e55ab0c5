import pytest
import torch

from qvl.errors import QvlError
from qvl.models.build import official_config, official_processor
from qvl.models.load import model_class
from qvl.models.sizes import SIZES, get_size
from qvl.models.tokens import OFFICIAL_IDS


@pytest.fixture(scope="module")
def processor():
    return official_processor()


def test_official_processor_has_official_token_ids(processor):
    tok = processor.tokenizer
    for text, official in OFFICIAL_IDS.items():
        assert tok.convert_tokens_to_ids(text) == official
    assert OFFICIAL_IDS["<|image_pad|>"] == 151655 and OFFICIAL_IDS["<|im_end|>"] == 151645
    assert processor.image_processor.size["longest_edge"] == 16_777_216


@pytest.mark.parametrize("name", ["2B", "8B", "30B-A3B"])
def test_size_table_matches_the_built_architecture(name, processor):
    """The parameter counts in sizes.py equal those of the model the builder makes."""
    facts = SIZES[name]
    cfg = official_config(name, processor)
    assert cfg.model_type == facts.model_type
    assert cfg.image_token_id == 151655 and cfg.vision_start_token_id == 151652
    with torch.device("meta"):
        model = model_class(cfg.model_type)(cfg)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == facts.params_total
    assert sum(p.numel() for n, p in params.items() if n.startswith("model.visual.")) == facts.params_vision
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert tied == facts.tie_word_embeddings
    assert model.config.text_config.num_hidden_layers == facts.text_layers


def test_facts():
    assert get_size("Qwen/Qwen3-VL-8B-Instruct") is SIZES["8B"]
    assert get_size("qwen3-vl-30b-a3b-thinking") is SIZES["30B-A3B"]
    assert get_size("4b") is SIZES["4B"]
    with pytest.raises(KeyError):
        get_size("7B")
    # KV cache per token, bf16: 2 (K,V) x 36 layers x 8 kv heads x 128 x 2 bytes
    assert SIZES["8B"].kv_bytes_per_token() == 147_456
    assert SIZES["8B"].params_llm_body == 8_767_123_696 - 576_388_336 - 2 * 622_329_856
    assert SIZES["30B-A3B"].params_active < SIZES["30B-A3B"].params_total / 7


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(QvlError, match="qwen2_5_vl"):
        model_class("qwen2_5_vl")


def test_model_random_cli_builds_an_official_shaped_checkpoint(tmp_path, monkeypatch):
    """`qvl model random` end to end, on a made-up small size so the test stays fast."""
    import json

    from typer.testing import CliRunner

    from qvl.cli.main import app
    from qvl.models import sizes
    from qvl.models.load import load

    small = sizes.SizeFacts("XS", 64, 2, 4, 2, 128, False, 2, 64, 128, (0, 1), params_total=1)
    monkeypatch.setitem(sizes.SIZES, "XS", small)
    res = CliRunner().invoke(app, ["model", "random", "--size", "XS", "--out", str(tmp_path / "xs"), "--dtype", "float32",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "xs" / "config.json").read_text())
    assert cfg["image_token_id"] == OFFICIAL_IDS["<|image_pad|>"] and cfg["text_config"]["vocab_size"] == 151936
    model, processor = load(tmp_path / "xs")
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert model.config.text_config.num_hidden_layers == 2
