"""Several GPUs: the engine that shares each step between ranks, chosen by one config key.

    engine      chosen by            what it shards                      optimizer
    ddp         (neither key)        nothing (one process: no wrapper)   torch AdamW
    deepspeed   deepspeed: X.json    ZeRO-2 grads + states; ZeRO-3 also   qvl's AdamW handed to DeepSpeed
                                     the weights; offload to CPU          (DeepSpeed's CPU Adam under offload)
    fsdp        fsdp: full_shard     FSDP2: every decoder layer, every    torch AdamW over the sharded
                                     vision block and the rest (root)     (DTensor) parameters

Every engine gets qvl's parameter groups (one per component x decay, each with its LR) and qvl's
schedule, so vision_tower_lr / mm_projector_lr and freezing mean the same under all of them.
The loop drives every engine the same way: :func:`micro_step` per micro-batch (forward +
backward; gradients sync on the last one), then :func:`finish_step` (clip, update, schedule).

Sharded weights (ZeRO-3, FSDP) are gathered module by module when a module runs, with a
collective that every rank must join. A rank whose micro-batch has no image would skip the
vision tower and leave the others waiting (the ZeRO-3 hang every peer knows). :func:`balance_media`
gives such a micro-batch a label-free fake image (or video) appended after its real tokens, so
every rank runs the same graph, forward and backward, whether the tower trains or not. (A dummy
tower run whose output only joins the loss times 0 is not enough under ZeRO-3: its backward
differs from a rank whose tower output feeds the LLM, and the ranks' collectives drift apart.)
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qvl.errors import QvlError
from qvl.train import components as comp
from qvl.train import optimizers
from qvl.train.config import TrainConfig

ENGINES = ("ddp", "deepspeed", "fsdp")


# --------------------------------------------------------------------------------------------------
# Launch: `qvl train CONFIG nproc=N` -> torchrun
# --------------------------------------------------------------------------------------------------

def under_launcher() -> bool:
    """Whether torchrun (or another launcher of several processes) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def needs_launch(cfg: TrainConfig) -> bool:
    return bool(cfg.nproc and cfg.nproc > 1 and not under_launcher())


def engine_for_ranks(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, str]:
    """(config, note): a DeepSpeed ZeRO-0/1/2 JSON on one process runs as plain single-GPU training.

    ZeRO-1/2 shard optimizer states and gradients between ranks; with one rank they shard nothing, and DeepSpeed's
    engine would only stand between the loop and the fast path (packed rows replayed as CUDA graphs, compiled
    layers). The official one-card recipe passes ``--deepspeed zero2.json`` all the same, so it runs here without
    DeepSpeed installed. ZeRO-3 and offload keep DeepSpeed: they move memory (to the CPU) even on one GPU. Full
    fine-tuning keeps fp32 master weights under ``master_weights: auto``, as DeepSpeed would have."""
    if world_size != 1 or not cfg.deepspeed:
        return cfg, ""
    from qvl.train.preflight import zero_settings

    stage, offload = zero_settings(cfg)
    if stage > 2 or offload:
        return cfg, ""
    update = {"deepspeed": None}
    masters = ""
    if not cfg.lora_enable and cfg.bf16 and cfg.master_weights == "auto":
        update["master_weights"] = "fp32"
        masters = "; fp32 master weights, as DeepSpeed keeps them"
    note = (f"deepspeed={cfg.deepspeed} (ZeRO-{stage}) on one process: ZeRO-{stage} shards nothing with one rank, so "
            f"this runs as single-GPU training on qvl's fast path, without DeepSpeed{masters}; ZeRO-3 or offload "
            "would keep DeepSpeed")
    return cfg.model_copy(update=update), note


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The command that runs ``python -m qvl.train ARGV`` on ``nproc`` local processes (one machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "qvl.train", *argv]


def check_nproc(nproc: int) -> None:
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise QvlError(f"nproc={nproc} but this machine has {torch.cuda.device_count()} GPU(s)", where="nproc",
                       fix=f"nproc={torch.cuda.device_count()}, or launch on several machines with torchrun "
                       "(docs/train.md, \"Several GPUs\")")


def cpu_threads_per_process(nproc: int, env=None) -> str | None:
    """OMP_NUM_THREADS for each of ``nproc`` processes: the cores shared out, unless the user set it.

    torchrun sets 1 when it is unset, which leaves DeepSpeed's CPU Adam (ZeRO offload) and other host-side
    math on one core per rank: minutes per step for an 8B model.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    return str(max(1, (os.cpu_count() or 1) // max(1, nproc)))


def relaunch(argv: list[str], nproc: int, say=print) -> None:
    """Replace this process with torchrun running the same training on ``nproc`` processes."""
    check_nproc(nproc)
    cmd = torchrun_command(argv, nproc)
    threads = cpu_threads_per_process(nproc)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = threads  # inherited by torchrun and its workers
    say(f"launching {nproc} processes: {shlex.join(cmd[1:])}"
        + (f" (OMP_NUM_THREADS={threads} each)" if threads else ""))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


# --------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------

def init_group(device: torch.device) -> None:
    """A process group even for one process: DeepSpeed and FSDP2 need one (torchrun sets the rest).

    Outside torchrun the group is made with an explicit address, leaving os.environ untouched.
    """
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
        torch.distributed.init_process_group(backend)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def owns_process() -> bool:
    """This process is a torchrun worker with no process group yet: the run about to start is all it is for, so a
    finished one may end it at once (:func:`end_group`'s ``exit_after``). Not for a caller's own process (tests, a
    notebook, a script that made its group before calling in)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and not (torch.distributed.is_available()
                                                         and torch.distributed.is_initialized())


def end_group(finished: bool, exit_after: bool = False) -> None:
    """Destroy the process group before the process exits (the entry points call this; in-process callers keep
    theirs, which DeepSpeed caches). Left to the interpreter's exit, gloo's worker threads can abort a finished rank
    ("terminate called without an active exception": two clean-clone CI runs on 2026-12-05 lost a 2-rank test to it;
    pytorch/pytorch#190489), and NCCL warns that it was not destroyed. ``finished``: the run ended well, so every
    rank meets at a barrier first (none leaves while another is still in a collective). ``exit_after`` (the entry
    points pass :func:`owns_process` from before the run): a finished run's process then ends at once
    (:func:`_exit_without_finalizing`), and the caller's code after this does not run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if finished:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if finished and exit_after:
        _exit_without_finalizing()


def _exit_without_finalizing() -> None:
    """End a finished rank here, its outputs written and flushed, without the interpreter's finalization: a gloo
    rank still aborted in it after the group was destroyed (SIGABRT, "terminate called without an active
    exception", a clean-clone CI run on 2026-12-05 under load; gloo's worker threads hold tensors whose release then
    takes the GIL from a dying interpreter, pytorch/pytorch#179291)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:  # C's own buffers too (os._exit skips libc's exit, which would flush them)
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(0)


def shards_weights(cfg: TrainConfig) -> bool:
    """Whether weights are gathered per module in forward (ZeRO-3, FSDP): every rank must run every module."""
    from qvl.train.preflight import zero_settings

    return cfg.engine == "fsdp" or (cfg.engine == "deepspeed" and zero_settings(cfg)[0] == 3)


def master_weights_fp32(cfg: TrainConfig) -> bool:
    """Whether trainable weights are kept in float32 next to a bf16 model before the engine wraps it.

    LoRA adapters are by default (also on one GPU), full fine-tuning on one GPU / DDP when
    ``master_weights: fp32``; FSDP2 keeps its shards in float32 and computes in bf16
    (MixedPrecisionPolicy) unless ``master_weights: bf16``. DeepSpeed casts the model to bf16 and keeps
    float32 masters itself (bf16 ones with ``master_weights: bf16``: :func:`qvl.train.config.deepspeed_config`).
    """
    if not cfg.bf16 or cfg.engine == "deepspeed":
        return False
    if cfg.engine == "fsdp":
        return not bf16_masters(cfg)  # LoRA adapters stay fp32 whatever master_weights says
    if cfg.master_weights == "auto":
        return cfg.lora_enable
    return cfg.master_weights == "fp32"


def bf16_masters(cfg: TrainConfig) -> bool:
    """Whether a sharding engine keeps bf16 master weights, gradients and AdamW states (``master_weights: bf16``):
    8 bytes per trained parameter instead of 16, what lets a full 8B fine-tune fit 2 x 80 GB without offload."""
    return cfg.bf16 and cfg.master_weights == "bf16" and cfg.engine in ("deepspeed", "fsdp") and not cfg.lora_enable


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------

@dataclass
class Engine:
    name: str  # ddp | deepspeed | fsdp
    runner: object  # called as runner(batch, n_labels): LossModule, DDP, DeepSpeed engine, FSDP root
    optimizer: torch.optim.Optimizer  # qvl's own (DeepSpeed wraps it; its param_groups carry the LRs)
    scheduler: object
    trainable: list = field(default_factory=list)
    max_grad_norm: float = 1.0
    world_size: int = 1
    sharded: bool = False  # weights sharded (ZeRO-3, FSDP): gathered per module in forward
    packed: bool = False  # micro-batches are packed rows (data_flatten / data_packing)
    zero: int = 0
    offload: bool = False
    notes: list[str] = field(default_factory=list)
    standing_grads: bool = False  # .grad tensors are zeroed, never freed (CUDA graphs: graphs.standing_grads)

    @property
    def balance_vision(self) -> bool:
        """Whether every rank must see the same media kinds per micro-batch (several ranks, and sharded weights
        or DeepSpeed: ZeRO-2 reduces gradients in buckets in the order they become ready, so a rank whose
        vision tower ran on a dummy input reduces different buckets than one that ran it on images - a
        collective size mismatch, seen on 2 gloo ranks)."""
        return (self.sharded or self.name == "deepspeed") and self.world_size > 1


def build_optimizer(model, cfg: TrainConfig, device: torch.device, offload: bool = False, notes=None):
    """``optim`` (torch AdamW, or bitsandbytes' 8-bit AdamW: qvl.train.optimizers) over qvl's parameter groups;
    DeepSpeed's CPU Adam (same groups) when DeepSpeed offloads it."""
    groups = comp.optimizer_groups(comp.param_groups(model, cfg), cfg.weight_decay)
    kw = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if offload:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            # bf16 master weights: DeepSpeed requires the CPU moments in bf16 too (bf16_optimizer_states)
            return DeepSpeedCPUAdam(groups, adamw_mode=True, fp32_optimizer_states=not bf16_masters(cfg), **kw)
        except Exception as e:  # noqa: BLE001 -- its C++ op is built on first use: no compiler, no CPU Adam
            if bf16_masters(cfg):  # DeepSpeed accepts only its CPU Adam (bf16 moments) with bf16 masters offloaded
                raise QvlError(f"master_weights=bf16 with optimizer offload needs DeepSpeed's CPU Adam, which could "
                               f"not be built ({type(e).__name__}: {str(e)[:200]})", where="master_weights",
                               fix="install a C++ compiler and ninja (DeepSpeed builds the op on first use), or "
                               "drop master_weights=bf16 (fp32 states on the CPU), or use zero3.json without "
                               "offload") from e
            if notes is not None:
                notes.append(f"DeepSpeed's CPU Adam could not be built ({type(e).__name__}: {str(e)[:200]}); "
                             "torch AdamW runs on the offloaded states instead (slower)")
    # the fused kernel on one GPU / DDP / DeepSpeed; FSDP2's sharded (DTensor) states take the default path
    return optimizers.build(groups, cfg, device, sharded_states=cfg.engine == "fsdp")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fsdp_units(model) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one: every vision block and every decoder layer (the rest is the root)."""
    inner = _base(model).model
    return [*inner.visual.blocks, *inner.language_model.layers]


def shard_fsdp(loss_module, model, cfg: TrainConfig, device: torch.device, world_size: int) -> None:
    """FSDP2 (``fully_shard``) per vision block and decoder layer, then the root; bf16 compute, fp32 reduce."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.bf16 else None, reduce_dtype=torch.float32)
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    # the root is the loss module, not the model: the model's class (saved as config.json's
    # "architectures") must stay Qwen3VL..., not FSDP's renamed subclass
    fully_shard(loss_module, mesh=mesh, mp_policy=mp)


def prepare(loss_module, model, cfg: TrainConfig, dist, device: torch.device, lr_fn) -> Engine:
    """Wrap / shard ``loss_module`` for ``cfg.engine`` and build the optimizer and schedule."""
    from qvl.train.preflight import zero_settings

    name = cfg.engine
    notes: list[str] = []
    zero, offload = zero_settings(cfg) if name == "deepspeed" else (0, False)
    if name == "fsdp":
        shard_fsdp(loss_module, model, cfg, device, dist.world_size)
    optimizer = build_optimizer(model, cfg, device, offload=offload and name == "deepspeed", notes=notes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    runner = loss_module
    if name == "deepspeed":
        runner = _deepspeed_engine(loss_module, model, optimizer, cfg, dist.world_size, notes)
    elif dist.enabled and name == "ddp":
        runner = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Engine(name, runner, optimizer, scheduler, trainable, cfg.max_grad_norm, dist.world_size,
                  shards_weights(cfg), cfg.data_flatten or cfg.data_packing, zero, offload, notes)


def _deepspeed_engine(loss_module, model, optimizer, cfg: TrainConfig, world_size: int, notes: list[str]):
    try:
        import deepspeed
    except ImportError:
        raise QvlError("deepspeed is set but DeepSpeed is not installed", where="deepspeed",
                       fix="pip install deepspeed (DS_BUILD_OPS=0 is enough: ops build when first used), "
                       "or use fsdp=full_shard (PyTorch FSDP2, nothing to install)") from None
    from qvl.train.config import deepspeed_config

    ds = deepspeed_config(cfg, world_size, _base(model).config.get_text_config().hidden_size, notes)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it (a lone process without torchrun has none)
    engine, _, _, _ = deepspeed.initialize(model=loss_module, optimizer=optimizer, config=ds,
                                           dist_init_required=False)
    return engine


# --------------------------------------------------------------------------------------------------
# One micro-batch, one step
# --------------------------------------------------------------------------------------------------

class FakeMedia:
    """One label-free image and one label-free video sample (Encoded), made on first use.

    They ride along in a micro-batch that lacks the media another rank's micro-batch has: appended
    after the real tokens (causal attention: nothing before them sees them; no labels: no loss),
    they make this rank's forward and backward the same graph as the other ranks'.
    """

    def __init__(self, processor, cfg: TrainConfig):
        self.processor, self.cfg = processor, cfg
        self._made: dict = {}

    def __getitem__(self, kind: str):
        if kind not in self._made:
            self._made[kind] = self._make(kind)
        return self._made[kind]

    def _make(self, kind: str):
        import tempfile

        from PIL import Image

        from qvl.data.preprocess import IGNORE_INDEX, encode
        from qvl.data.samples import parse_sample

        with tempfile.TemporaryDirectory(prefix="qvl_fake_") as tmp:
            side = 32 * max(2, int((self.cfg.min_pixels ** 0.5) // 32) + 1)
            Image.new("RGB", (side, side), (128, 128, 128)).save(f"{tmp}/f.png")
            media = {"image": "f.png"} if kind == "image" else {"video": [["f.png", "f.png"]], "sample_fps": 2}
            raw = {**media, "conversations": [{"from": "human", "value": f"<{kind}>"}, {"from": "gpt", "value": "x"}]}
            sample, problems = parse_sample(raw, 0, tmp, f"<fake {kind}>")
            if sample is None:
                raise QvlError(f"could not build the balancing {kind}: {problems[0].render()}")
            enc = encode(sample, self.processor, self.cfg.vision_budget())
        enc.labels = torch.full_like(enc.input_ids, IGNORE_INDEX)
        return enc


def media_in(item: dict) -> tuple[bool, bool]:
    """(images, videos) in a loader item (a collated ``batch`` or packed ``samples``)."""
    if item.get("samples"):
        return (any(e.pixel_values is not None for e in item["samples"]),
                any(e.pixel_values_videos is not None for e in item["samples"]))
    batch = item.get("batch") or {}
    return "pixel_values" in batch, "pixel_values_videos" in batch


def append_sample(batch: dict, enc, pad_id: int) -> dict:
    """``batch`` (right-padded rows) with ``enc`` appended after the last row's tokens, its media last."""
    from qvl.data.collate import collate
    from qvl.data.preprocess import IGNORE_INDEX

    extra = collate([enc], pad_id, "right")
    rows, width = batch["input_ids"].shape
    n = extra["input_ids"].shape[1]
    out = dict(batch)
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0), ("labels", IGNORE_INDEX)):
        if key not in batch:
            continue
        t = torch.full((rows, width + n), fill, dtype=batch[key].dtype)
        t[:, :width] = batch[key]
        t[-1, width:] = extra[key][0]
        out[key] = t
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in extra:
            out[key] = torch.cat([batch[key], extra[key]]) if key in batch else extra[key]
    return out


def pad_micro_batches(items: list[dict], device) -> list[dict]:
    """Several ranks: empty items appended until every rank has as many as the rank with the most (they
    become fake-image micro-batches in :func:`balance_media`). One small all-reduce."""
    most = torch.tensor([len(items)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return items + [{"batch": None, "skipped": {}} for _ in range(int(most.item()) - len(items))]


def balance_media(eng: Engine, items: list[dict], fakes: FakeMedia, device, pad_id: int) -> list[dict]:
    """Several ranks: the same number of micro-batches everywhere, and under sharded weights the same media.

    A micro-batch whose samples were all skipped becomes the fake image alone (no labels). With
    sharded weights (ZeRO-3, FSDP) or DeepSpeed a micro-batch gets the fake image (video) when another rank's
    micro-batch of the same position has images (videos): every rank then runs the vision tower
    as often, and its output reaches the loss the same way, so the weight gathers and gradient
    reductions of all ranks match (a rank that skipped the tower would leave the others waiting).
    One small all-reduce per step.
    """
    from qvl.data.collate import collate

    out = []
    for item in items:
        if not item.get("error") and not item.get("samples") and item.get("batch") is None:
            if eng.packed:
                item = dict(item, samples=[fakes["image"]])
            else:
                item = dict(item, batch=collate([fakes["image"]], pad_id, "right"))
        out.append(item)
    if not eng.balance_vision or any(item.get("error") for item in out):
        return out
    own = torch.tensor([media_in(item) for item in out], dtype=torch.int64, device=device)
    most = own.clone()
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    for j, (have, need) in enumerate(zip(own.tolist(), most.tolist())):
        for k, kind in enumerate(("image", "video")):
            if need[k] and not have[k]:
                item = out[j]
                if item.get("samples"):
                    out[j] = dict(item, samples=[*item["samples"], fakes[kind]])
                else:
                    out[j] = dict(item, batch=append_sample(item["batch"], fakes[kind], pad_id))
    return out


def micro_step(eng: Engine, batch: dict, n_labels: float, last: bool, autocast=None) -> torch.Tensor:
    """Forward + backward of one micro-batch; gradients are reduced across ranks on the ``last`` one.

    ``n_labels`` is the step's label-token count over every rank, divided by the world size (each
    engine averages gradients over ranks). Returns the micro-batch's summed token loss (detached).
    """
    autocast = autocast or contextlib.nullcontext()
    runner = eng.runner
    if eng.name == "deepspeed":
        runner.set_gradient_accumulation_boundary(last)
        with autocast:
            loss, part = runner(batch, n_labels)
        runner.backward(loss, scale_wrt_gas=False)  # the loss is already divided by the step's tokens
        runner.step()  # updates only on the boundary (the last micro-batch)
        return part
    if eng.name == "fsdp":
        runner.set_requires_gradient_sync(last)
        ctx = contextlib.nullcontext()
    else:
        ctx = runner.no_sync() if eng.world_size > 1 and not last else contextlib.nullcontext()
    with ctx:
        with autocast:
            loss, part = runner(batch, n_labels)
        loss.backward()
    return part


def finish_step(eng: Engine):
    """Clip, update and advance the schedule (DeepSpeed clipped and updated in the last micro_step)."""
    if eng.name == "deepspeed":
        norm = eng.runner.get_global_grad_norm()
    else:
        norm = None
        if eng.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(eng.trainable, eng.max_grad_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                norm = norm.full_tensor()
        eng.optimizer.step()
        eng.optimizer.zero_grad(set_to_none=not eng.standing_grads)
    eng.scheduler.step()
    return norm  # a tensor (read with the step's other numbers in one host sync), a float, or None


# --------------------------------------------------------------------------------------------------
# Checkpoints (resume on N ranks) and the servable folder
# --------------------------------------------------------------------------------------------------

def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def state_writer(eng: Engine, model):
    """A function ``write(folder)`` every rank calls inside a checkpoint; None: qvl's own files (rank 0)."""
    if eng.name == "deepspeed":
        def write(folder: Path) -> None:
            eng.runner.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False,
                                       exclude_frozen_parameters=True)
        return write
    if eng.name == "fsdp":
        def write(folder: Path) -> None:
            import torch.distributed.checkpoint as dcp

            dcp.save(_dcp_state(eng, model), checkpoint_id=str(folder / "dcp"))
        return write
    return None


def state_reader(eng: Engine, model):
    """The counterpart of :func:`state_writer`: ``read(folder)`` restores weights and optimizer on every rank."""
    if eng.name == "deepspeed":
        def read(folder: Path) -> None:
            path, _ = eng.runner.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False,
                                                 load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise QvlError(f"{folder} holds no DeepSpeed state", where="resume",
                               fix="resume with the engine that wrote it, or start fresh with resume=false")
        return read
    if eng.name == "fsdp":
        def read(folder: Path) -> None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            if not (folder / "dcp").is_dir():
                raise QvlError(f"{folder} holds no FSDP state (dcp/)", where="resume",
                               fix="resume with the engine that wrote it, or start fresh with resume=false")
            state = _dcp_state(eng, model)
            dcp.load(state, checkpoint_id=str(folder / "dcp"))
            set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
            set_optimizer_state_dict(model, eng.optimizer, state["optim"])
        return read
    return None


def _dcp_state(eng: Engine, model) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    names = _trainable_names(model)  # frozen weights come from the base model, not from every checkpoint
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in names}
    return {"model": weights, "optim": get_optimizer_state_dict(model, eng.optimizer)}


def full_state_dict(eng: Engine, model, lora: bool, dtype=None) -> dict | None:
    """Every rank calls this. Rank 0 gets the full weights on the CPU (LoRA: the trainable ones only),
    gathered from ZeRO-3 partitions or FSDP shards, cast to ``dtype`` when given; other ranks get None.
    None on every rank when nothing is sharded (the model saves itself)."""
    if not eng.sharded:
        return None
    wanted = _trainable_names(model) if lora else None
    rank = torch.distributed.get_rank()
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, t: torch.Tensor) -> None:
        if rank == 0:
            t = t.detach()
            out[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).cpu().clone()

    if eng.name == "fsdp":
        for name, p in model.named_parameters():
            if wanted is None or name in wanted:
                keep(name, p.full_tensor() if hasattr(p, "full_tensor") else p)
    else:
        import deepspeed

        for prefix, module in model.named_modules():
            params = [(n, p) for n, p in module.named_parameters(recurse=False)
                      if wanted is None or f"{prefix}.{n}".lstrip(".") in wanted]
            if not params:
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                for n, p in params:
                    keep(f"{prefix}.{n}".lstrip("."), p)
    if wanted is None:  # persistent buffers are whole on every rank
        for prefix, module in model.named_modules():
            for n, b in module.named_buffers(recurse=False):
                if b is not None and n not in module._non_persistent_buffers_set:
                    keep(f"{prefix}.{n}".lstrip("."), b)
    return out if rank == 0 else None
