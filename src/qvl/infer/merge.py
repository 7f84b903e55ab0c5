"""``qvl merge``: base + LoRA adapter -> one standalone checkpoint, verified.

Fixes what users hit with ``merge_and_unload().save_pretrained()`` (QwenLM/Qwen3-VL#1715,
LlamaFactory#5749/#10169): the merged folder also holds the processor, tokenizer, chat template
and generation config, so vLLM and transformers load it directly. The folder appears only when
complete (``atomic_dir``), and only after it was reloaded and its logits matched base+adapter on
one image+text sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qvl.errors import QvlError

REQUIRED_FILES = ("config.json", "generation_config.json", "preprocessor_config.json",
                  "video_preprocessor_config.json", "tokenizer_config.json")


@dataclass
class MergeReport:
    path: Path
    max_abs_diff: float | None  # merged vs base+adapter logits on the probe sample
    tolerance: float | None
    same_argmax: bool | None
    files: list[str]


def probe_inputs(processor):
    """One small image + text prompt: exercises the vision tower, merger and language model."""
    import numpy as np
    from PIL import Image

    from qvl.data.collate import collate
    from qvl.data.preprocess import encode
    from qvl.data.samples import Media, Message, Sample
    from qvl.models.tokens import token_ids

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    sample = Sample([Message("user", [Media("image", img), "Describe the picture in one word."])])
    enc = encode(sample, processor, for_generation=True)
    return collate([enc], pad_id=token_ids(processor.tokenizer).pad, padding_side="left")


def _logits(model, inputs):
    import torch

    p = next(model.parameters())
    batch = {k: (v.to(p.dtype) if k.startswith("pixel_values") else v).to(p.device) for k, v in inputs.items()}
    with torch.inference_mode():
        return model(**batch).logits.float().cpu()


def quantized_training(adapter: str | Path) -> str | None:
    """The ``quantization`` (nf4 / int8) a qvl run trained ``adapter`` with, from its qvl_train.json; else None."""
    import json

    meta = Path(adapter) / "qvl_train.json"
    try:
        return (json.loads(meta.read_text()).get("config") or {}).get("quantization") if meta.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None


def refuse_quantized_base(path: Path) -> None:
    """A base whose config.json says it is stored quantised (bitsandbytes, GPTQ, AWQ...): merging there would round
    the adapter's update into the quantised grid and write a quantised folder."""
    from qvl.models.load import read_config

    quant = read_config(path).get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantised") if isinstance(quant, dict) else "quantised"
        raise QvlError(f"the base {path} is stored quantised ({method}): the merged weights would be rounded to it",
                       where="--base", fix="pass the original 16-bit checkpoint the run was trained from (its "
                       "adapter_config.json names it: base_model_name_or_path)")


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, dtype=None, overwrite: bool = False,
                  verify: bool = True, device: str | None = None, say=lambda msg: None) -> MergeReport:
    import torch
    from peft import PeftModel

    from qvl.infer.transformers_backend import adapter_info
    from qvl.models.load import load
    from qvl.utils.fs import atomic_dir

    adapter_info(str(adapter))
    trained_on = quantized_training(adapter)
    if trained_on:  # QLoRA: the adapter goes into the 16-bit weights, never into dequantised 4-bit ones
        say(f"the adapter was trained on {trained_on} base weights: it is merged into the base's own "
            f"{'weights in ' + str(dtype).removeprefix('torch.') if dtype else 'weights (their dtype)'} from {base}, "
            "not into dequantised ones")
    say(f"loading base {base} and adapter {adapter}")
    from qvl.models.load import resolve

    refuse_quantized_base(resolve(base))
    model, processor = load(base, dtype=dtype, device=device)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except Exception as e:
        raise QvlError(f"cannot apply adapter {adapter} to {base}: {type(e).__name__}: {e}",
                       fix="use the base checkpoint the adapter was trained on") from None
    peft_model.eval()
    inputs = probe_inputs(processor) if verify else None
    reference = _logits(peft_model, inputs) if verify else None
    merged = peft_model.merge_and_unload().eval()
    report = MergeReport(Path(out), None, None, None, [])
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp)
        # Standalone image/video processor files too: older transformers and other servers look for
        # preprocessor_config.json (its absence broke merged folders: Qwen3-VL#1715, LlamaFactory#5749).
        processor.image_processor.save_pretrained(tmp)
        processor.video_processor.save_pretrained(tmp)
        processor.save_pretrained(tmp)  # processor_config.json, tokenizer, chat template
        if getattr(merged, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
            merged.generation_config.save_pretrained(tmp)
        missing = [f for f in REQUIRED_FILES if not (tmp / f).is_file()]
        if not any((tmp / f).is_file() for f in ("chat_template.jinja", "chat_template.json")) and \
                "chat_template" not in (tmp / "tokenizer_config.json").read_text():
            missing.append("a chat template")
        if missing:
            raise QvlError(f"merged folder would miss {', '.join(missing)}", fix="report this as a qvl bug")
        report.files = sorted(p.name for p in tmp.iterdir())
        if verify:
            say("verifying: reloading the merged folder and comparing logits with base+adapter")
            reloaded, _ = load(tmp, dtype=dtype, device=device)
            got = _logits(reloaded, inputs)
            diff = float((got - reference).abs().max())
            scale = float(reference.abs().max()) or 1.0
            p_dtype = next(reloaded.parameters()).dtype
            tol = (1e-4 if p_dtype == torch.float32 else 3e-2) * max(1.0, scale)
            same = bool((got[:, -1].argmax(-1) == reference[:, -1].argmax(-1)).all())
            report.max_abs_diff, report.tolerance, report.same_argmax = diff, tol, same
            del reloaded
            if diff > tol:
                raise QvlError(f"merged logits differ from base+adapter by {diff:.3g} (tolerance {tol:.3g}); "
                               f"nothing was written to {out}",
                               fix="check that the adapter matches the base model and dtype")
    return report
