"""qvl: fine-tune, evaluate and serve Qwen3-VL."""

__version__ = "0.1.0"
