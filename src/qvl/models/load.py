"""Load a Qwen3-VL model and processor by hub id or local path.

The model class comes from ``config.json``'s ``model_type`` (never from the folder name, which
is how the official code loads a fine-tuned ``./output`` as Qwen2-VL). Without network and
without a local copy, the user gets one error saying how to get the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qvl.errors import QvlError

MODEL_CLASSES = {
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}


def model_class(model_type: str):
    import transformers

    try:
        return getattr(transformers, MODEL_CLASSES[model_type])
    except KeyError:
        known = ", ".join(MODEL_CLASSES)
        raise QvlError(
            f"model_type {model_type!r} is not a Qwen3-VL model (qvl supports: {known})",
            fix="pass a Qwen3-VL checkpoint (config.json model_type qwen3_vl or qwen3_vl_moe)",
        ) from None


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder with config.json for ``name_or_path``: the path itself or the hub cache."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise QvlError(f"{p} has no config.json", fix="point --model at a Hugging Face checkpoint folder")
        return p
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise QvlError(f"model {name!r} is neither a local folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:  # the local cache first: works offline and costs nothing when the files are there
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise _not_here(name, "HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(name))
    except Exception as e:  # no network, gated repo, typo: all end in the same advice
        raise _not_here(name, f"download failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def _not_here(name: str, why: str) -> QvlError:
    return QvlError(
        f"model {name!r} is not on this machine and could not be downloaded ({why})",
        fix=(
            f"on a machine with internet: `huggingface-cli download {name} --local-dir ./{name.split('/')[-1]}`, "
            "copy the folder here and pass its path as --model; or build a random-weight stand-in with "
            "`qvl model random --size 8B --out DIR` / the test model with `qvl model tiny --out DIR`"
        ),
    )


def read_config(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise QvlError(f"config.json is not valid JSON ({e})", where=str(path)) from None


def load_processor(name_or_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve(name_or_path))


def load_model(name_or_path, dtype=None, device=None, attn_implementation: str | None = None):
    """Load weights into the class named by config.json's model_type."""
    import torch

    path = resolve(name_or_path)
    cls = model_class(read_config(path).get("model_type", "<missing>"))
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(path, **kwargs)
    if device is not None:
        model = model.to(torch.device(device))
    return model.eval()


def load(name_or_path, dtype=None, device=None, attn_implementation: str | None = None):
    """(model, processor) for a checkpoint."""
    return load_model(name_or_path, dtype, device, attn_implementation), load_processor(name_or_path)
