"""Checkpoints that resume exactly, written atomically; the final servable output folder.

A checkpoint ``OUTPUT/checkpoint-STEP/`` holds the trainable weights, optimizer, scheduler, the
RNG states of every generator in play and the loop position (the data order is a pure function
of seed and position, so nothing else is needed to continue identically). It is written into
``OUTPUT/.checkpoint-STEP.tmp`` (every rank writes its RNG file there) and renamed when complete; the last file written is
``qvl_checkpoint.json``, which lists every file with its size. Resume takes the newest folder
whose marker is present and whose files match it, so a save killed half-way is never picked.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch

from qvl.errors import QvlError
from qvl.utils.fs import disk_space_for, move_into_place

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STALE_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|old)(-\d+)?$")  # (-PID: older qvl)
MARKER = "qvl_checkpoint.json"
RUN_CONFIG = "train_config.yaml"  # written at the start of every run
FORMAT = 1


def unwrap(model):
    """The module under DDP / loss wrappers (a PeftModel stays a PeftModel)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def tensor_bytes(value) -> int:
    """Bytes of the tensors in ``value`` (dicts, lists and tuples followed): what saving it writes, about."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _disk_fix(output_dir: Path) -> str:
    last = complete_checkpoints(output_dir)
    keep = f"the last complete checkpoint, {last[-1]}, is kept: resume=true continues from it" if last else \
        "no complete checkpoint was written yet"
    return (f"free space on that disk or set output_dir to a larger one (save_total_limit keeps fewer checkpoints; "
            f"save_steps saves less often); {keep}")


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, state: dict,
                    rank: int = 0, save_total_limit: int | None = None, _crash_before_marker: bool = False,
                    write_state=None) -> Path:
    """Write ``checkpoint-STEP`` atomically; prune old ones beyond ``save_total_limit``.

    Under torchrun every rank calls this: rank 0 writes the folder, each rank adds its RNG file,
    and rank 0 seals and renames it once all of them are in (barriers in between). With sharded
    weights / optimizer states (DeepSpeed, FSDP), ``write_state(folder)`` is called on every rank
    instead of rank 0 writing ``trainable.safetensors`` and ``optimizer.pt``.
    """
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"  # the same name on every rank (not per PID)
    @contextlib.contextmanager
    def room(needed: int):  # out of disk space: said so, and rank 0 leaves no half-written checkpoint filling it
        try:
            with disk_space_for(output_dir, f"checkpoint-{step}", needed, fix=_disk_fix(output_dir)):
                yield
        except QvlError:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step killed earlier
        tmp.mkdir(parents=True)
        weights = trainable_state(model) if write_state is None else {}
        optim = optimizer.state_dict() if write_state is None else {}
        with room(tensor_bytes(weights) + tensor_bytes(optim)):
            if write_state is None:
                save_file(weights, str(tmp / "trainable.safetensors"))
                torch.save(optim, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
    _barrier()  # the folder exists before the other ranks write into it
    with room(0):  # each rank's own files: sharded weights / states, its RNG (dropout differs per rank in DDP)
        if write_state is not None:
            write_state(tmp)
        torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    _barrier()  # every RNG file is in before rank 0 lists the files and renames the folder
    if rank != 0:
        _barrier()
        return final
    if _crash_before_marker:  # tests: a save killed before it completed
        raise KeyboardInterrupt("simulated crash during checkpoint save")
    with room(0):
        written = sorted(f for f in tmp.rglob("*") if f.is_file())  # engines write sub-folders (deepspeed/, dcp/)
        files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in written}
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "step": step, "files": files,
                                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
        for f in [*written, tmp / MARKER]:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    move_into_place(tmp, final)  # re-saving a step (after resuming from an older checkpoint) replaces it
    _fsync_dir(output_dir)
    if save_total_limit:
        for old in complete_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in output_dir.glob(".checkpoint-*"):  # temp folders of saves killed half-way (can be huge)
        if stale.is_dir() and STALE_RE.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temp folders and folders without a valid marker are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = complete_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0, read_state=None) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return the loop state.

    ``read_state(path)`` (every rank) restores weights and optimizer written by a ``write_state``.
    """
    path = Path(path)
    if not is_complete(path):
        raise QvlError(f"{path} is not a complete qvl checkpoint (no valid {MARKER})", where="resume",
                       fix="resume=true picks the newest complete checkpoint automatically")
    if read_state is not None:
        read_state(path)
    else:
        _load_weights_and_optimizer(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    rng_file = path / f"rng_{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return json.loads((path / "state.json").read_text())


def _load_weights_and_optimizer(path: Path, model, optimizer) -> None:
    from safetensors.torch import load_file

    if not (path / "trainable.safetensors").is_file():
        raise QvlError(f"{path} was written by a sharded engine (DeepSpeed / FSDP): it has no trainable.safetensors",
                       where="resume", fix="resume with the same deepspeed / fsdp setting, or start fresh with "
                       "resume=false")
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(unwrap(model).named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    if missing or unknown:
        raise QvlError(f"checkpoint does not match the model being trained ({len(missing)} trainable weights missing, "
                       f"{len(unknown)} unknown, e.g. {(missing or unknown)[0]})", where=str(path),
                       fix="resume with the same tune_mm_* / lora_* settings, or start fresh with resume=false")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t.to(params[n].dtype))
    saved_optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    theirs, ours = _states_kind(saved_optim), _states_kind(optimizer.state_dict(), type(optimizer))
    if theirs and ours and theirs != ours:  # loads without complaint, then the first step fails on a missing key
        raise QvlError(f"the checkpoint's optimizer states are {theirs}'s, this run's optimizer is {ours}",
                       where=str(path), fix="resume with the optim the checkpoint was written with, or start fresh "
                       "with resume=false")
    try:
        optimizer.load_state_dict(saved_optim)
    except ValueError as e:  # other parameter groups, e.g. weight_decay or a *_lr switched on since
        raise QvlError(f"the checkpoint's optimizer does not match this run's parameter groups ({e})", where=str(path),
                       fix="resume with the same weight_decay / vision_tower_lr / mm_projector_lr settings, or "
                       "start fresh with resume=false") from None


def _states_kind(state_dict: dict, cls: type | None = None) -> str | None:
    """Whose states an optimizer state dict holds: "torch AdamW" or "bitsandbytes 8-bit AdamW" (from its entries,
    or from ``cls`` while it has none); None when it cannot tell."""
    if cls is not None and cls.__module__.startswith("bitsandbytes"):
        return "bitsandbytes 8-bit AdamW"
    if cls is not None and issubclass(cls, torch.optim.AdamW):
        return "torch AdamW"
    for entry in state_dict.get("state", {}).values():
        if "exp_avg" in entry:
            return "torch AdamW"
        if "state1" in entry or "__bnb_optimizer_quant_state__" in entry:
            return "bitsandbytes 8-bit AdamW"
    return None


def holds_run(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds an earlier qvl run (every run writes its config there first)."""
    return (Path(output_dir) / RUN_CONFIG).is_file()


def archive_run(output_dir: Path) -> Path | None:
    """Move everything in ``output_dir`` into ``output_dir/previous/TIMESTAMP`` (``resume=false``). Deletes nothing."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    items = [p for p in output_dir.iterdir() if p.name != "previous"]
    if not items:
        return None
    dest = output_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    dest.mkdir(parents=True)
    for p in items:
        p.rename(dest / p.name)
    return dest


# --------------------------------------------------------------------------------------------------
# Final output: directly servable
# --------------------------------------------------------------------------------------------------

def _base_reference(name_or_path: str) -> str:
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else name_or_path


def save_final(output_dir: Path, model, processor, cfg, extra: dict | None = None,
               state_dict: dict | None = None) -> list[str]:
    """Write the servable result into ``output_dir`` (files next to the checkpoints).

    ``state_dict``: the weights gathered from a sharded engine (ZeRO-3, FSDP), written instead of
    the model's own (whose parameters are shards there).

    LoRA: ``adapter_config.json`` (with ``base_model_name_or_path``) + ``adapter_model.safetensors``
    holding the adapters and every fully trained module. Full: ``config.json`` + weights. Both
    get the ORIGINAL processor (the model's inference pixel budgets, not the training ones),
    tokenizer and chat template.
    """
    output_dir = Path(output_dir)
    model = unwrap(model)
    tmp = output_dir / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    is_peft = hasattr(model, "peft_config")
    base = model.get_base_model() if is_peft else model
    if state_dict is not None:
        needed = tensor_bytes(state_dict)
    else:
        needed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not is_peft)
    try:
        with disk_space_for(output_dir, "the trained model", needed, fix=_disk_fix(output_dir)):
            _write_final(tmp, model, base, is_peft, processor, cfg, extra, state_dict)
        written = []
        for f in sorted(tmp.iterdir()):
            os.chmod(f, 0o644)
            os.replace(f, output_dir / f.name)
            written.append(f.name)
    finally:  # a failed save leaves no half-written model behind
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _write_final(tmp: Path, model, base, is_peft: bool, processor, cfg, extra: dict | None,
                 state_dict: dict | None) -> None:
    base.config.use_cache = True
    if getattr(base.config, "text_config", None) is not None:
        base.config.text_config.use_cache = True
    kw = {} if state_dict is None else {"state_dict": state_dict}
    if is_peft:
        model.save_pretrained(tmp, **kw)
        ac = tmp / "adapter_config.json"
        conf = json.loads(ac.read_text())
        conf["base_model_name_or_path"] = _base_reference(cfg.model_name_or_path)
        ac.write_text(json.dumps(conf, indent=2, sort_keys=True))
        (tmp / "README.md").unlink(missing_ok=True)
    else:
        base.save_pretrained(tmp, **kw)
    processor.save_pretrained(tmp)
    (tmp / "qvl_train.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), **(extra or {})},
                                                   indent=2, default=str))


def load_trained(path, dtype=None, device=None, merge: bool = False):
    """(model, processor) for a qvl training output: a full checkpoint, or base + LoRA adapter."""
    from qvl.models.load import load, load_model

    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from peft import PeftModel

        base_ref = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_ref:
            raise QvlError("adapter_config.json names no base_model_name_or_path", where=str(path))
        base = load_model(base_ref, dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, str(path))
        if merge:
            model = model.merge_and_unload()
        from transformers import AutoProcessor

        return model.eval(), AutoProcessor.from_pretrained(path)  # the adapter folder has no config.json
    return load(path, dtype=dtype, device=device)
