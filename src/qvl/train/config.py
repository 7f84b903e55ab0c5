"""The training config: one flat set of keys, official names wherever the official recipe has one.

Sources, later ones win: the YAML file, then ``key=value`` (``qvl train``) or ``--key value``
(``python -m qvl.train``, the official ``sft_*.sh`` form). Values from the command line are
read as YAML scalars (``true``, ``1e-5``, ``[llm, merger]``) and then checked by pydantic, so
``--bf16``, ``--bf16 True`` and ``bf16=true`` all mean the same. Unknown keys and impossible
combinations are errors that name the key.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from qvl.config.vision import VisionBudget
from qvl.errors import QvlError

_VB = VisionBudget()

LORA_COMPONENTS = ("llm", "vision", "merger")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")

# Official flags that mean nothing to qvl's loop. They are accepted (so an sft_*.sh script ports
# unchanged) and reported once; values that would change results are refused instead.
IGNORED_KEYS = {
    "per_device_eval_batch_size": "qvl trains without an eval loop; use `qvl eval` on the output",
    "eval_strategy": "qvl trains without an eval loop; use `qvl eval` on the output",
    "evaluation_strategy": "qvl trains without an eval loop; use `qvl eval` on the output",
    "base_interval": "unused in the official code as well",
    "cache_dir": "models are resolved with the Hugging Face cache (HF_HOME)",
    "model_type": "qvl reads the model class from config.json",
    "ddp_find_unused_parameters": "not needed: every rank runs the vision tower (dummy input on text-only batches)",
    "remove_unused_columns": "not used by qvl's loop",
    "dataloader_pin_memory": "not used by qvl's loop",
    "local_rank": "read from the LOCAL_RANK environment variable (torchrun sets it)",
    "tf32": "TF32 matmuls are enabled on GPUs that support them",
    "overwrite_output_dir": "qvl never deletes a run; see `resume`",
    "do_train": "always true",
}


# Below 1, torch's partitioner may move a dropout into the backward graph, where it draws a new mask: the gradients
# then belong to another dropout than the forward's, silently. Reproduced on CPU with torch 2.11 and 2.14.1
# (2026-12-05, tests/train/test_rng_guards.py); open upstream (pytorch/pytorch#190758). One fact, read by the
# config check and by gradient_checkpointing_ratio auto (qvl.train.preflight).
DROPOUT_UNDER_BUDGET = ("torch's partitioner, under an activation_memory_budget below 1, may recompute LoRA's dropout "
                        "in backward with a new mask: silently wrong gradients (pytorch/pytorch#190758)")


def dropout_in_layers(cfg) -> bool:
    """Whether the decoder layers hold a random op: LoRA dropout."""
    return bool(cfg.lora_enable and cfg.lora_dropout > 0)


class TrainConfig(BaseModel):
    """Every key `qvl train` knows. Defaults follow the official recipe unless noted."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # --- model and data ---
    model_name_or_path: str = Field(..., description="hub id or local folder of a Qwen3-VL checkpoint")
    dataset_use: str = Field(..., description="comma-separated registry names, each optionally with %X")
    dataset_registry: str | None = Field(None, description="datasets.yaml (default: $QVL_DATASETS or ./datasets.yaml)")
    attn_implementation: str = "sdpa"
    # --- what trains ---
    tune_mm_vision: bool = False
    tune_mm_mlp: bool = False
    tune_mm_llm: bool = False
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: float = 128
    lora_dropout: float = 0.0
    lora_targets: list[str] = Field(default_factory=lambda: ["llm"], description="llm, vision, merger")
    lora_target_regex: str | None = Field(None, description="full-match regex over module names; replaces lora_targets")
    master_weights: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="with bf16: the precision of the trained weights and their AdamW states. auto: fp32 "
                            "for LoRA adapters and FSDP2 shards, bf16 for full fine-tuning on one GPU / DDP (as "
                            "the Hugging Face Trainer); fp32: also there (updates smaller than bf16's resolution are "
                            "not lost; 2x the trained weights' memory); DeepSpeed keeps its own fp32 copies; bf16: "
                            "also under DeepSpeed ZeRO and FSDP2 (8 instead of 16 bytes per trained parameter)")
    # --- quantised base weights (QLoRA; docs/train.md, "QLoRA"; qvl.train.quantize) ---
    quantization: Literal["nf4", "int8"] | None = Field(
        None, validation_alias=AliasChoices("quantization", "quantization_bit"),
        description="store the frozen linear layers of quantization_targets in 4 bits (nf4: bitsandbytes NF4, double "
                    "quantisation, matmuls in bf16) or 8 bits (int8: LLM.int8) and train LoRA adapters on them: 32B "
                    "in ~18 GiB instead of 62. LLaMA-Factory's quantization_bit: 4 | 8 means the same. Needs "
                    "bitsandbytes (pip install 'qvl[qlora]'); null: the load dtype")
    quantization_targets: list[str] = Field(default_factory=lambda: ["llm"], description="with quantization: whose "
                                            "linear layers are quantised (llm, vision: the tower's blocks and "
                                            "DeepStack mergers, merger: the patch merger); the vision tower and "
                                            "merger stay bf16 unless named")
    lora_experts: bool = Field(True, description="MoE models (30B-A3B, 235B-A22B): LoRA with the llm target also "
                                                 "reaches the experts' weights (peft target_parameters)")
    # --- optimisation ---
    learning_rate: float = 1e-5
    mm_projector_lr: float | None = None
    vision_tower_lr: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = Field("adamw_torch", description="adamw_torch (fused on CUDA), adamw_torch_foreach, adamw_8bit / "
                       "adamw_bnb_8bit or paged_adamw_8bit (bitsandbytes' 8-bit AdamW states; one GPU or DDP; "
                       "qvl.train.optimizers)")
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    # --- sequence and pixel budgets (training only; the saved processor keeps the model's own) ---
    model_max_length: int = 8192
    too_long: Literal["skip", "error"] = "skip"
    max_pixels: int = _VB.max_pixels
    min_pixels: int = _VB.min_pixels
    video_fps: float = _VB.video_fps
    video_min_frames: int = _VB.video_min_frames
    video_max_frames: int = _VB.video_max_frames
    video_max_pixels: int = _VB.video_max_pixels
    video_min_pixels: int = _VB.video_min_pixels
    # --- run folder ---
    output_dir: str = "./output"
    save_strategy: Literal["steps", "no"] = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    resume: bool | str = Field(True, description="true: continue from the newest complete checkpoint; false: "
                                                 "start fresh (old files are moved aside, never deleted); or a path")
    logging_steps: int = 1
    profile_steps: str | int | None = Field(None, description="optimizer steps to run under torch.profiler, e.g. 12 or "
                                      "12-14 (after warm-up): the run folder gets profile.txt (the GPU's busy share, "
                                      "operators by device and host time) and profile_trace.json.gz")
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    run_name: str | None = None
    # None: 4 worker processes on a GPU machine with cores to spare (encoding images off the step; measured
    # on an H100, 8B LoRA: 1,354 -> 1,949 tok/s), none on CPU-only machines where they would compete with training
    dataloader_num_workers: int | None = None
    # --- several GPUs (docs/train.md, "Several GPUs"): the engine follows from deepspeed / fsdp ---
    deepspeed: str | None = Field(None, description="DeepSpeed JSON (ZeRO-2 / ZeRO-3 / offload), e.g. "
                                                    "examples/deepspeed/zero3.json")
    fsdp: str | None = Field(None, description="full_shard: PyTorch FSDP2 (fully_shard per decoder layer and "
                                               "vision block, bf16 compute with fp32 master weights)")
    nproc: int | None = Field(None, description="processes (GPUs) on this machine: `qvl train` re-launches "
                                                "itself under torchrun with this many; torchrun sets it itself")
    balance_tokens: bool | None = Field(None, description="several ranks: split each micro-batch position's samples "
                                        "between the ranks by estimated tokens (longest first into the lightest "
                                        "rank, equal sample counts) instead of every N-th sample, so no rank waits "
                                        "on a longer row; the step's samples and loss stay the same. null: on with "
                                        "packed rows (data_flatten / data_packing) on several ranks, else off")
    # --- packed rows (docs/train.md, "Packing") ---
    data_flatten: bool = Field(True, description="concatenate each micro-batch's samples into one row (no padding), "
                               "each sample attending only to itself with its own positions: the same loss as padded "
                               "batches (tests/train/test_train_packing.py), 3.9x faster (8B LoRA, lora_8b_24gb.yaml, H200, "
                               "2026-12-04: 0.79 s a step against 3.05 s padded). false: padded batches, as the "
                               "official recipe's default")
    data_packing: bool = Field(False, description="records are packs (lists of samples, `qvl data pack`); each "
                                                  "micro-batch is per_device_train_batch_size packs in one row")
    packed_attention: Literal["auto", "flex", "sdpa", "per_sample", "flash_attention_2"] = Field(
        "auto", description="attention for packed rows: auto = flash_attention_2 if installed, else on CUDA "
                            "per_sample (torch >= 2.10; older: sdpa for rows up to 16k tokens, flex beyond), sdpa on "
                            "CPU; per_sample = causal attention per sample of the row, no mask (one flash-attention "
                            "varlen call per layer on a GPU, sdpa per sample elsewhere); sdpa = dense block-diagonal "
                            "mask")
    packed_row_tokens: int | Literal["auto"] | None = Field(
        "auto", description="token budget per packed row: a step's samples are regrouped into rows of up to this many "
                            "tokens (bigger rows keep a large GPU busy; the step's loss is the same); null: one row "
                            "per micro-batch. auto: 8,192 (or batch x model_max_length if longer) for a mixture-of-experts "
                            "model, whose every row reads all the experts' weights (30B-A3B LoRA on an H100: 5,024 "
                            "tok/s against 398 one sample a row; 11.3x transformers + peft), else null (dense 8B: "
                            "not faster)")
    # --- speed (docs/train.md, "Speed"; measured in docs/benchmarks.md) ---
    gradient_checkpointing_ratio: float | Literal["auto"] = Field(
        "auto", description="with gradient_checkpointing: the fraction of LLM decoder layers recomputed (evenly "
                            "spaced); lower is faster and uses more memory. auto: on a GPU, as few as the memory "
                            "preflight's plan allows at 90 % of the card, kept layers sized for the run's longest "
                            "planned row (with activation_memory_budget auto where whole layers compile); 1.0 when "
                            "the card is unknown (CPU)")
    gradient_checkpointing_scope: Literal["auto", "layer", "mlp"] = Field(
        "auto", description="what a recomputed decoder layer recomputes: layer = all of it (least memory); mlp = only "
                            "its MLP projections and elementwise work, keeping the attention half's matmul and "
                            "attention outputs (~30 KB per token per layer at 8B; one GPU / DDP, dense models). auto: "
                            "layer (where whole layers compile, layers kept under activation_memory_budget 0.8 plus "
                            "layers recomputed whole were measured faster than mlp for the same memory)")
    fused_cross_entropy: bool = Field(True, description="lm_head + loss in row chunks, never the full-vocabulary "
                                      "logits tensor")
    compile_layers: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder layer's norms, attention and MLP (one graph for all layers, "
                            "dynamic lengths), and a frozen vision tower's blocks. auto: on a GPU for packed rows with per_sample attention on one GPU / "
                            "DDP (measured faster there), a part that fails to compile runs eagerly; true: any "
                            "single-GPU / DDP run; false: off")
    activation_memory_budget: float | Literal["auto"] | None = Field(
        "auto", description="with compile_layers: the compiler's activation memory budget for what the compiled "
                            "layers keep for backward (torch._functorch's activation_memory_budget): below 1 its "
                            "partitioner recomputes the cheapest work per byte first (elementwise ops and copies, "
                            "then matmuls) until the kept activations are that fraction of what it would keep; "
                            "null: the compiler's default partition. auto: chosen with gradient_checkpointing_ratio "
                            "auto where whole layers compile (the looser of none / 0.8 at which every layer "
                            "is kept, else 0.8 with the fewest layers recomputed; none with LoRA dropout, which "
                            "below 1 may get a new mask in backward: pytorch/pytorch#190758), else null")
    compile_scope: Literal["layer", "parts"] = Field(
        "layer", description="what compile_layers compiles: layer = each whole decoder layer (norms, attention, LoRA "
                             "adapters, MLP, residual adds; gradient checkpointing inside the compiled code), parts = "
                             "each layer's norms, attention and MLP apart (checkpointing outside)")
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto", description="replay the decoder stack's forward and backward as CUDA graphs (qvl.train.graphs): the "
                            "GPU stops waiting for the host between kernels. Rows are padded to a multiple of "
                            "cuda_graphs_row_multiple tokens; every row shape the first 500 steps will meet is "
                            "recorded before training (~0.3-2 s each on an 8B model), others when they come; the "
                            "graphs' memory pool adds to the memory (10-22 GiB at 8B, not in the plan yet). Needs packed rows with "
                            "per_sample attention, bf16, one GPU. auto: on with compile_layers for LoRA with nothing "
                            "before the decoder training, on cards of >= 40 GiB, for rows of at most 12,288 tokens (8B LoRA "
                            "on an H100: +11 % tokens/s); "
                            "true: wherever it can replay; false: off (docs/benchmarks.md)")
    cuda_graphs_row_multiple: int = Field(256, ge=1, description="with cuda_graphs: packed rows are padded to a "
                                          "multiple of this many tokens (a padding sample without labels); larger: "
                                          "fewer recordings, more padding computed")
    gemm_row_multiple: int | Literal["auto"] = Field("auto", description="the loss head's label rows and the frozen vision tower's "
                                   "patches (each medium's, by a padding image whose tokens are not used) rounded up "
                                   "to a few multiples of this many (every one up to 15, then 8 per doubling: at most "
                                   "1/8 more), each met once before training, so no step meets a new matmul shape: "
                                   "cuBLAS holds the host until the GPU is idle the first time it meets one "
                                   "(bench/experiments/kernel_loading.py). auto: 128 on a GPU (one process or DDP), else 0 (off). "
                                   "A multiple of 4 (the tower merges 2 x 2 patches); the tower's padding needs the "
                                   "packed-row path (per_sample attention)")
    warmup_shapes: Literal["lazy", "ahead"] = Field(
        "lazy", description="when the shapes the fast path prepares are met: lazy = each when a step first needs it "
                            "(a CUDA graph recorded for a new row shape, a matmul shape met), so training starts "
                            "after the model loads and the layers compile; ahead = every row shape the first 500 steps "
                            "will make recorded, and every loss-head and vision-tower matmul shape met, before step 1 "
                            "(minutes on an 8B model; no later step pauses). Steps that compile or record are "
                            "warm-up steps: the progress line's tok/s and ETA leave them out")
    host_embeddings: Literal["auto"] | bool = Field(
        "auto", description="keep the frozen input-embedding table in host memory and look each packed row's tokens "
                            "up there (1.16 GiB of GPU memory back at 8B, 1.45 at 32B; 37 MB copied per 4,608-token "
                            "row). Needs the packed-row path (per_sample attention), one process, an embedding that "
                            "is frozen and not tied to the LM head (Qwen3-VL 8B and up). auto: on when the memory "
                            "preflight says the run does not fit the card without it and does with it")
    activation_offloading: Literal["auto"] | bool = Field(
        "auto", description="recomputed decoder layers keep their inputs in pinned host memory (2·hidden bytes a "
                            "token per layer: 1.25 GiB for a 2,048-token row at 32B), copied out in forward and back "
                            "in backward (qvl.train.offload). Needs gradient checkpointing, the packed-row path and "
                            "no CUDA graphs. auto: on when the memory preflight says the run does not fit without "
                            "it (after host_embeddings) and does with it")
    # --- memory preflight (docs/plan.md) ---
    force: bool = Field(False, description="train even when the memory preflight predicts out-of-memory")
    gpu_mem: str | float | None = Field(None, description="the GPU memory to train within (e.g. 24GiB; default: the "
                                        "detected card, or $QVL_GPU_MEM): the preflight and automatic recompute plan "
                                        "for it, and on a larger card the process's allocator is capped to it, so a "
                                        "run that fits here fits a card of that size")
    # --- accepted for compatibility (see IGNORED_KEYS) ---
    ignored: dict = Field(default_factory=dict, exclude=True)

    @field_validator("lora_targets", "report_to", "quantization_targets", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("quantization", mode="before")
    @classmethod
    def _bits(cls, v):
        from qvl.train.quantize import normalise

        return normalise(v)  # quantization_bit: 4 / 8, and null / false spelled any way

    @field_validator("save_strategy", mode="before")
    @classmethod
    def _no(cls, v):
        return "no" if v is False else v  # YAML (and `save_strategy=no` on the command line) reads `no` as false

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp(cls, v):
        if v is None or v is False or (isinstance(v, str) and v.strip().lower() in ("", "false", "no", "null", "none")):
            return None
        if v is True or (isinstance(v, str) and v.strip().lower() in ("true", "yes")):
            return "full_shard"
        if isinstance(v, list):
            v = " ".join(str(x) for x in v)
        words = str(v).split()
        if "full_shard" not in words or not set(words) <= {"full_shard", "auto_wrap"}:
            raise ValueError("qvl's FSDP engine is FSDP2 full sharding: use fsdp: full_shard "
                             "(\"full_shard auto_wrap\", the Trainer form, means the same)")
        return "full_shard"

    @property
    def engine(self) -> str:
        """How ranks share the work: ``deepspeed`` (a JSON), ``fsdp`` (FSDP2) or ``ddp`` (also one process)."""
        return "deepspeed" if self.deepspeed else "fsdp" if self.fsdp else "ddp"

    def longest_row(self) -> int:
        """The most tokens one micro-batch row can hold: ``batch x model_max_length`` (a padded batch, or one packed
        row), or with ``packed_row_tokens`` that budget (a sample longer than it gets a row of its own)."""
        whole = self.per_device_train_batch_size * self.model_max_length
        budget = self.row_budget()
        if budget:
            return max(self.model_max_length, min(budget, whole * self.gradient_accumulation_steps))
        return whole

    def row_budget(self) -> int | None:
        """``packed_row_tokens`` as a number or None, ``auto`` resolved as the run resolves it once at its start
        (:func:`qvl.train.preflight.auto_row_budget`), so a function handed the config as written plans the same
        rows."""
        if self.packed_row_tokens == "auto":
            from qvl.train.preflight import auto_row_budget

            return auto_row_budget(self)[0].packed_row_tokens
        return self.packed_row_tokens

    def balances_tokens(self, world_size: int) -> bool:
        """Whether ranks split micro-batch positions by estimated tokens (``balance_tokens``; null: packed rows)."""
        if world_size < 2:
            return False  # one rank takes the whole chunk: nothing to balance
        return self.balance_tokens if self.balance_tokens is not None else self.data_flatten or self.data_packing

    def vision_budget(self) -> VisionBudget:
        try:
            return VisionBudget(min_pixels=self.min_pixels, max_pixels=self.max_pixels, video_fps=self.video_fps,
                                video_min_frames=self.video_min_frames, video_max_frames=self.video_max_frames,
                                video_min_pixels=self.video_min_pixels, video_max_pixels=self.video_max_pixels)
        except ValueError as e:
            key = str(e).split("=")[0]
            raise QvlError(str(e), where=key) from None

    @property
    def lora_components(self) -> tuple[str, ...]:
        return tuple(self.lora_targets) if self.lora_enable and not self.lora_target_regex else ()

    def trains(self, component: str) -> bool:
        """Whether ``component`` (vision, merger, llm) trains at all, fully or through LoRA."""
        flag = {"vision": self.tune_mm_vision, "merger": self.tune_mm_mlp, "llm": self.tune_mm_llm}[component]
        return flag or component in self.lora_components

    def check(self) -> TrainConfig:
        """Combinations that cannot work. Each error names the key to change."""
        def bad(key, what, fix=None):
            raise QvlError(what, where=key, fix=fix)

        if self.bf16 and self.fp16:
            bad("fp16", "bf16 and fp16 are both true", "keep one (bf16 is what Qwen3-VL is trained in)")
        if self.fp16:
            bad("fp16", "fp16 training is not supported (Qwen3-VL overflows in fp16)", "use bf16=true")
        if not (self.lora_enable or self.tune_mm_vision or self.tune_mm_mlp or self.tune_mm_llm):
            bad("tune_mm_llm", "nothing would train: tune_mm_vision, tune_mm_mlp, tune_mm_llm and lora_enable are all false",
                "set tune_mm_llm=true (full) or lora_enable=true")
        if self.lora_enable:
            if self.lora_r < 1:
                bad("lora_r", f"lora_r={self.lora_r} must be >= 1")
            if self.lora_alpha <= 0:
                bad("lora_alpha", f"lora_alpha={self.lora_alpha} must be > 0")
            if not 0 <= self.lora_dropout < 1:
                bad("lora_dropout", f"lora_dropout={self.lora_dropout} must be in [0, 1)")
            unknown = [t for t in self.lora_targets if t not in LORA_COMPONENTS]
            if unknown:
                bad("lora_targets", f"unknown LoRA target(s) {unknown}", f"use any of {list(LORA_COMPONENTS)} "
                    "or lora_target_regex for a custom pattern")
            if not self.lora_targets and not self.lora_target_regex:
                bad("lora_targets", "lora_enable=true but lora_targets is empty", "e.g. lora_targets=[llm]")
            if self.tune_mm_llm and "llm" not in self.lora_components and not self.lora_target_regex:
                bad("tune_mm_llm", "tune_mm_llm=true with LoRA that does not cover the LLM would train the whole LLM "
                    "next to the adapters", "add llm to lora_targets, or set lora_enable=false for a full fine-tune")
        if self.quantization:
            from qvl.train.quantize import QUANT_COMPONENTS, config_problem

            unknown = [t for t in self.quantization_targets if t not in QUANT_COMPONENTS]
            if unknown or not self.quantization_targets:
                bad("quantization_targets", f"unknown or no quantization target(s) {unknown}",
                    f"use any of {list(QUANT_COMPONENTS)}")
            if "llm" not in self.quantization_targets:  # QLoRA is LoRA on a quantised LLM (the planner's model too)
                bad("quantization_targets", f"quantization_targets={self.quantization_targets} leaves the LLM in "
                    "16 bits: quantisation here is for LoRA on a 4-bit (or 8-bit) LLM", "add llm "
                    "(quantization_targets: [llm, vision]), or quantization: null")
            problem = config_problem(self)
            if problem:
                bad(*problem)
        # An LR for a frozen component is harmless (official scripts do it): say so, do not fail.
        if self.vision_tower_lr is not None and not self.trains("vision") and not self.lora_target_regex:
            warnings.warn("vision_tower_lr is set but nothing in the vision tower trains (tune_mm_vision=false)",
                          stacklevel=2)
        if self.mm_projector_lr is not None and not self.trains("merger") and not self.lora_target_regex:
            warnings.warn("mm_projector_lr is set but the merger does not train (tune_mm_mlp=false)", stacklevel=2)
        for key in ("learning_rate", "mm_projector_lr", "vision_tower_lr"):
            v = getattr(self, key)
            if v is not None and v < 0:
                bad(key, f"{key}={v} must be >= 0")
        if self.lr_scheduler_type not in SCHEDULERS:
            bad("lr_scheduler_type", f"unknown scheduler {self.lr_scheduler_type!r}", f"use one of {list(SCHEDULERS)}")
        from qvl.train.optimizers import NAMES

        if self.optim not in NAMES:
            bad("optim", f"optimizer {self.optim!r} is not supported", "use adamw_torch (fused kernel on CUDA), or "
                "adamw_8bit / paged_adamw_8bit (bitsandbytes' 8-bit states: 2 bytes per trained parameter, not 8)")
        if (self.activation_memory_budget not in (None, "auto")
                and not 0 < self.activation_memory_budget <= 1):
            bad("activation_memory_budget", f"activation_memory_budget={self.activation_memory_budget} must be in "
                "(0, 1]")
        if (dropout_in_layers(self) and self.activation_memory_budget not in (None, "auto")
                and self.activation_memory_budget < 1):
            bad("activation_memory_budget", f"activation_memory_budget={self.activation_memory_budget:g} with "
                f"lora_dropout={self.lora_dropout:g}: {DROPOUT_UNDER_BUDGET}",
                "set lora_dropout=0, or activation_memory_budget=auto (it keeps the compiler's default partition "
                "when LoRA has dropout)")
        if self.gradient_checkpointing_ratio != "auto" and not 0 <= self.gradient_checkpointing_ratio <= 1:
            bad("gradient_checkpointing_ratio", f"gradient_checkpointing_ratio={self.gradient_checkpointing_ratio} "
                "must be in [0, 1]")
        if isinstance(self.packed_row_tokens, int):
            if self.packed_row_tokens < 1:
                bad("packed_row_tokens", f"packed_row_tokens={self.packed_row_tokens} must be >= 1")
            if not (self.data_flatten or self.data_packing):
                bad("packed_row_tokens", "packed_row_tokens regroups packed rows, but nothing is packed",
                    "set data_flatten=true (or data_packing=true), or packed_row_tokens=null")
        if not 0 <= self.warmup_ratio <= 1:
            bad("warmup_ratio", f"warmup_ratio={self.warmup_ratio} must be in [0, 1]")
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length",
                    "logging_steps", "save_steps"):
            if getattr(self, key) < 1:
                bad(key, f"{key}={getattr(self, key)} must be >= 1")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            bad("num_train_epochs", "num_train_epochs <= 0 and no max_steps: there is nothing to do")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            bad("save_total_limit", f"save_total_limit={self.save_total_limit} must be >= 1 (or null for no limit)")
        if self.profile_steps is not None:
            from qvl.train.profile import parse_steps

            parse_steps(self.profile_steps)  # names the key and the fix
        unknown = [r for r in self.report_to if r not in ("tensorboard", "wandb", "none")]
        if unknown:
            bad("report_to", f"unknown tracker(s) {unknown}", "use tensorboard, wandb or none")
        if self.deepspeed and self.fsdp:
            bad("fsdp", "deepspeed and fsdp are both set: one engine shards the model",
                "keep one: deepspeed=examples/deepspeed/zero3.json or fsdp=full_shard")
        if self.nproc is not None and self.nproc < 1:
            bad("nproc", f"nproc={self.nproc} must be >= 1")
        if self.gemm_row_multiple != "auto" and (self.gemm_row_multiple < 0 or self.gemm_row_multiple % 4):
            bad("gemm_row_multiple", f"gemm_row_multiple={self.gemm_row_multiple} is not a multiple of 4 (the vision "
                "tower merges 2 x 2 patches) >= 0", "use auto, 0 (off), 128 or 512")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            bad("dataloader_num_workers", "must be >= 0")
        if self.gpu_mem is not None:
            from qvl.plan.gpus import parse_mem

            try:
                parse_mem(self.gpu_mem)
            except QvlError as e:
                bad("gpu_mem", e.what, e.fix)
        model = Path(self.model_name_or_path).expanduser()
        if model.is_dir():
            out, model = Path(self.output_dir).expanduser().resolve(), model.resolve()
            if out == model or out in model.parents:
                bad("output_dir", f"output_dir {self.output_dir} {'is' if out == model else 'holds'} the model "
                    f"folder {self.model_name_or_path}: the run would write its weights over the model's "
                    "(resume=false would move the model aside)", "choose another output_dir, e.g. runs/NAME")
        self.vision_budget()
        return self

    def lr_for(self, component: str) -> float:
        if component in ("vision", "deepstack") and self.vision_tower_lr is not None:
            return self.vision_tower_lr
        if component == "merger" and self.mm_projector_lr is not None:
            return self.mm_projector_lr
        return self.learning_rate


# --------------------------------------------------------------------------------------------------
# Reading: YAML + overrides
# --------------------------------------------------------------------------------------------------

class Raw(str):
    """A value typed on the command line; converted per key in :func:`build_config`."""


def _convert(key: str, value):
    """Command-line text -> value: YAML scalars (true, 3, [a, b], null) except for text keys."""
    import yaml

    if not isinstance(value, Raw):
        return value
    text = str(value)
    field = TrainConfig.model_fields.get(key)
    if field is not None and field.annotation in (str, str | None):
        return None if field.annotation != str and text.lower() in ("null", "none", "") else text
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text  # pydantic names the key if the text does not fit


def parse_overrides(args: list[str]) -> tuple[list[str], dict]:
    """Split ``args`` into positional words and overrides.

    Accepts ``key=value``, ``--key value``, ``--key=value`` and a bare ``--flag`` (true).
    """
    positional, out = [], {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            key = a[2:]
            if "=" in key:
                key, value = key.split("=", 1)
                out[key.replace("-", "_")] = Raw(value)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[key.replace("-", "_")] = Raw(args[i + 1])
                i += 1
            else:
                out[key.replace("-", "_")] = True
        elif "=" in a and not a.startswith("="):
            key, value = a.split("=", 1)
            out[key.strip()] = Raw(value)
        else:
            positional.append(a)
        i += 1
    return positional, out


def read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise QvlError(f"config file {p} not found", fix="pass a YAML file, e.g. examples/tiny_cpu.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise QvlError(f"invalid YAML: {e}", where=str(p)) from None
    if not isinstance(data, dict):
        raise QvlError("a training config must be a mapping of key: value", where=str(p))
    return data


def build_config(values: dict, source: str = "config") -> TrainConfig:
    """Validate ``values`` into a checked TrainConfig; errors name the offending key."""
    values = {k: _convert(k, v) for k, v in values.items()}
    if "quantization" in values and "quantization_bit" in values:  # the alias (LLaMA-Factory's name) and the key
        raise QvlError("quantization and quantization_bit are both set (quantization_bit is LLaMA-Factory's name "
                       "for it)", where=source, fix="keep one: quantization: nf4 (or quantization_bit: 4)")
    ignored = {}
    for key in list(values):
        if key in IGNORED_KEYS:
            ignored[key] = values.pop(key)
    try:
        cfg = TrainConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "<config>"
        if err["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(key, list(TrainConfig.model_fields) + list(IGNORED_KEYS), n=1)
            raise QvlError(f"unknown key {key!r}", where=source,
                           fix=f"did you mean {close[0]!r}?" if close else "see docs/train.md for every key") from None
        if err["type"] == "missing":
            raise QvlError(f"required key {key!r} is missing", where=source,
                           fix=f"add `{key}: ...` to the YAML or pass {key}=...") from None
        raise QvlError(f"{key}={err.get('input')!r}: {err['msg']}", where=source) from None
    cfg.ignored = ignored
    for key, value in ignored.items():
        if value not in (False, None, "no", 0, "", "false"):
            warnings.warn(f"{key}={value!r} is ignored: {IGNORED_KEYS[key]}", stacklevel=2)
    return cfg.check()


def load_config(path: str | os.PathLike | None, overrides: dict | None = None) -> TrainConfig:
    values = read_yaml(path) if path else {}
    values.update(overrides or {})
    return build_config(values, source=str(path) if path else "command line")


def from_argv(argv: list[str]) -> TrainConfig:
    """``[CONFIG.yaml] [--key value | key=value ...]`` -> TrainConfig."""
    positional, overrides = parse_overrides(argv)
    if len(positional) > 1:
        raise QvlError(f"expected at most one config file, got {positional}",
                       fix="pass overrides as key=value or --key value")
    return load_config(positional[0] if positional else None, overrides)


# --------------------------------------------------------------------------------------------------
# DeepSpeed JSON: checked and completed here, so the per-component LR groups always apply
# --------------------------------------------------------------------------------------------------

def deepspeed_config(cfg: TrainConfig, world_size: int = 1, hidden_size: int | None = None,
                     notes: list[str] | None = None) -> dict:
    """Read ``cfg.deepspeed`` and fill every ``"auto"`` from the qvl config.

    qvl hands DeepSpeed its own optimizer (AdamW, or DeepSpeed's CPU Adam under optimizer offload)
    with one parameter group per component, and steps its own schedule. An ``optimizer`` or
    ``scheduler`` block would make DeepSpeed build its own and silently drop those groups
    (vision_tower_lr / mm_projector_lr) and the schedule, which is what happens with the
    official ``zero3_offload.json``. A block whose params are all ``"auto"`` (the official one)
    asks for nothing qvl does not already do: it is dropped and ``notes`` says so. A block with
    explicit values is refused with the key to use instead.
    """
    import json

    p = Path(cfg.deepspeed)
    if not p.is_file():
        raise QvlError(f"DeepSpeed config {p} not found", where="deepspeed",
                       fix="use examples/deepspeed/zero2.json, zero3.json or zero3_offload.json")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise QvlError(f"not valid JSON ({e})", where=str(p)) from None
    if not isinstance(ds, dict):
        raise QvlError("a DeepSpeed config must be a JSON object", where=str(p))
    for block in ("optimizer", "scheduler"):
        if block not in ds:
            continue
        params = (ds[block] or {}).get("params") if isinstance(ds[block], dict) else None
        if isinstance(params, dict) and all(v == "auto" for v in params.values()):
            del ds[block]
            if notes is not None:
                notes.append(f"{p.name}: its {block!r} block (all \"auto\") is not used: qvl's "
                             f"{'AdamW with per-component LR groups' if block == 'optimizer' else 'schedule'} is")
            continue
        raise QvlError(f"the DeepSpeed config has its own {block!r} block, which would replace qvl's "
                       f"{'per-component LR groups' if block == 'optimizer' else 'LR schedule'}",
                       where=f"{p}: {block}", fix=f"delete the {block!r} block (qvl configures it from "
                       "learning_rate / vision_tower_lr / mm_projector_lr / weight_decay / adam_* / "
                       "lr_scheduler_type / warmup_*)")

    def fill(d: dict, key: str, value):
        if d.get(key, "auto") == "auto":
            d[key] = value

    micro, acc = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    fill(ds, "train_micro_batch_size_per_gpu", micro)
    fill(ds, "gradient_accumulation_steps", acc)
    fill(ds, "train_batch_size", micro * acc * world_size)
    fill(ds, "gradient_clipping", cfg.max_grad_norm)
    if "bf16" in ds:
        fill(ds["bf16"], "enabled", cfg.bf16)
    if "fp16" in ds:
        fill(ds["fp16"], "enabled", False)
    zero = ds.get("zero_optimization", {})
    if hidden_size:
        fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
        fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    from qvl.train.distributed import bf16_masters

    # DeepSpeed's own switches for bf16 masters: qvl sets them from master_weights (its CPU Adam and the memory
    # preflight follow that key), so a file that sets them differently is refused rather than half-obeyed
    keys = ("bf16_master_weights_and_grads", "bf16_optimizer_states")
    block_name = "bfloat16" if "bfloat16" in ds and "bf16" not in ds else "bf16"  # DeepSpeed reads both spellings
    block = ds.get(block_name) if isinstance(ds.get(block_name), dict) else {}
    own = {k: block[k] for k in keys if k in block}
    wanted = bf16_masters(cfg) and int(zero.get("stage", 0) or 0) >= 1
    if own and any(bool(v) != wanted for v in own.values()):
        raise QvlError(f"the DeepSpeed config sets {', '.join(f'{k}={v}' for k, v in own.items())} but "
                       f"master_weights={cfg.master_weights}", where=f"{p}: {block_name}",
                       fix="delete those keys and choose with master_weights: bf16 (bf16 masters and AdamW states) "
                       "or fp32 / auto (DeepSpeed's fp32 copies)")
    if wanted:
        ds[block_name] = {"enabled": True, **block, **dict.fromkeys(keys, True)}
        if notes is not None:
            notes.append("master_weights=bf16: DeepSpeed keeps bf16 master weights, gradients and AdamW states "
                         "(bf16_master_weights_and_grads, bf16_optimizer_states): 8 bytes per trained parameter "
                         "instead of 16; updates below bf16's resolution (~0.4 % of a weight) are lost")
    return ds
