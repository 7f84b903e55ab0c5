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


def adapter_base(path: Path) -> str | None:
    """For a PEFT adapter folder (adapter_config.json, no config.json): its base model; else None."""
    cfg = Path(path) / "adapter_config.json"
    if (Path(path) / "config.json").is_file() or not cfg.is_file():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise QvlError("adapter_config.json names no base_model_name_or_path", where=str(path),
                       fix="pass the base with --model and this folder with --adapter")
    return base


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder with config.json (or a PEFT adapter folder) for ``name_or_path``: the path or the hub cache."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
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


def _has_processor(path: Path) -> bool:
    return any((path / n).is_file() for n in ("processor_config.json", "preprocessor_config.json"))


def load_processor(name_or_path):
    """The processor of a checkpoint; for an adapter folder without one, the base model's."""
    from transformers import AutoProcessor

    path = resolve(name_or_path)
    base = adapter_base(path)
    if base is not None and not _has_processor(path):
        path = resolve(base)
    return AutoProcessor.from_pretrained(path)


def load_model(name_or_path, dtype=None, device=None, attn_implementation: str | None = None, adapter=None):
    """Load weights into the class named by config.json's model_type, plus an optional PEFT adapter.

    ``name_or_path`` may itself be an adapter folder (what LoRA training writes): its base is
    loaded from ``base_model_name_or_path`` and the adapter applied on top.
    """
    import torch

    path = resolve(name_or_path)
    base = adapter_base(path)
    if base is not None:
        if adapter is not None:
            raise QvlError(f"{path} is already an adapter folder", fix="pass its base model with --model")
        path, adapter = resolve(base), path
    cls = model_class(read_config(path).get("model_type", "<missing>"))
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(path, **kwargs)
    from qvl.models.attention import use_vision_sdpa

    use_vision_sdpa(model)  # no per-shape cuDNN planning on the host for every image (see qvl.models.attention)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise QvlError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)", where="--adapter")
        model = PeftModel.from_pretrained(model, str(adapter))
    if device is not None:
        model = model.to(torch.device(device))
    return model.eval()


def load(name_or_path, dtype=None, device=None, attn_implementation: str | None = None, adapter=None):
    """(model, processor) for a checkpoint, an adapter folder, or a base plus ``adapter``."""
    model = load_model(name_or_path, dtype, device, attn_implementation, adapter)
    processor_source = adapter if adapter is not None and _has_processor(Path(adapter)) else name_or_path
    return model, load_processor(processor_source)
