"""`qvl plan serve|train`: predict GPU memory before loading anything, and say what fits."""

from __future__ import annotations


import typer

from qvl.cli.main import friendly

app = typer.Typer(help="Plan GPU memory for serving or training Qwen3-VL (no weights needed).",
                  no_args_is_help=True)

_MODEL = typer.Argument(..., help="Size (2B, 4B, 8B, 32B, 30B-A3B, 235B-A22B), hub id, or checkpoint folder / "
                        "config.json.")
_GPU = typer.Option(None, "--gpu", help="h100, h200, a100-80g, a100-40g, l40s, rtx4090, rtx5090, rtx3090, a10g, "
                    "l4, … (see `qvl plan gpus`).")
_GPU_MEM = typer.Option(None, "--gpu-mem", help="Card memory instead of --gpu, e.g. 32GiB, 24GB, 81559MiB.")
_JSON = typer.Option(False, "--json", help="Print one JSON object instead of the table.")


def _emit(plan, as_json: bool) -> None:
    from qvl.plan.report import render, to_json_text

    if as_json:
        typer.echo(to_json_text(plan))
    else:
        render(plan)


@app.command("serve")
@friendly
def serve(model: str = _MODEL, gpu: str = _GPU, gpu_mem: str = _GPU_MEM,
          gpus: int = typer.Option(1, "--gpus", help="GPUs (tensor parallel)."),
          backend: str = typer.Option("vllm", help="vllm or transformers."),
          max_model_len: int = typer.Option(None, help="Context length (default: the model's 262,144)."),
          gpu_memory_utilization: float = typer.Option(0.9, help="vLLM's share of the card."),
          max_num_seqs: int = typer.Option(None, help="Concurrent sequences (vLLM default 1024 on ≥70 GiB cards, "
                                           "else 256; transformers: batch, default 1)."),
          max_num_batched_tokens: int = typer.Option(None, help="vLLM tokens per step (default 8192 / 2048)."),
          image_tokens: int = typer.Option(None, help="Visual tokens of the largest image (pixels / 1024); "
                                           "default: the hub processor maximum 16,384 for vLLM, 1,024 otherwise."),
          video_frames: int = typer.Option(0, help="Frames of the largest video (merged in pairs)."),
          video_frame_tokens: int = typer.Option(256, help="Visual tokens per pair of video frames."),
          kv_cache_dtype: str = typer.Option("auto", help="auto (bf16) or fp8."),
          enforce_eager: bool = typer.Option(False, help="vLLM without CUDA graphs."),
          vllm_version: str = typer.Option(None, help="The vLLM version whose KV accounting to reproduce, e.g. 0.11.0 "
                                           "(default: the newest; V0 before 0.8, CUDA graphs subtracted from 0.21)."),
          vllm_engine: str = typer.Option(None, help="v0 for vLLM's V0 engine (VLLM_USE_V1=0) on 0.8 – 0.10."),
          skip_mm_profiling: bool = typer.Option(False, "--skip-mm-profiling", help="vLLM's --skip-mm-profiling "
                                                 "(or --limit-mm-per-prompt with every modality 0): no encoder profile."),
          decode: str = typer.Option("fast", help="transformers: `qvl serve`'s --decode, fast (slot KV cache, a few "
                                     "prompts prefilled at a time, vision cache) or generate (whole batch at once)."),
          as_json: bool = _JSON):
    """Memory for serving: vLLM's KV-cache budget (or transformers generate peak) and the largest context that fits."""
    from qvl.errors import QvlError
    from qvl.plan.memory import plan_serve

    if decode not in ("fast", "generate"):
        raise QvlError(f"--decode {decode!r} is not a choice", fix="use fast or generate")

    plan = plan_serve(model, gpu, gpu_mem, backend=backend, max_model_len=max_model_len,
                      gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens, image_tokens=image_tokens,
                      video_frames=video_frames, video_frame_tokens=video_frame_tokens,
                      kv_cache_dtype=kv_cache_dtype, enforce_eager=enforce_eager, gpus=gpus,
                      vllm_version=vllm_version, vllm_engine=vllm_engine, skip_mm_profiling=skip_mm_profiling,
                      fast_decode=decode == "fast" and backend in ("transformers", "hf"))
    _emit(plan, as_json)
    if not plan.fits:
        raise typer.Exit(1)


@app.command("train")
@friendly
def train(model: str = _MODEL, gpu: str = _GPU, gpu_mem: str = _GPU_MEM,
          gpus: int = typer.Option(1, "--gpus", help="Data-parallel GPUs (ZeRO shards over them)."),
          method: str = typer.Option("lora", help="lora, qlora or full."),
          quantization: str = typer.Option(None, help="nf4 or int8: LoRA on quantised LLM linears (`qvl train`'s "
                                           "quantization; nf4 is --method qlora)."),
          quantization_targets: str = typer.Option("llm", help="With quantization: llm, or llm,vision[,merger] "
                                                   "(`qvl train`'s quantization_targets)."),
          zero: int = typer.Option(0, help="DeepSpeed ZeRO stage 0, 1, 2 or 3 (0: plain torch / DDP)."),
          offload: bool = typer.Option(False, help="ZeRO offload of optimizer states (and ZeRO-3 params) to CPU."),
          gradient_checkpointing: bool = typer.Option(True, help="Recompute activations in backward."),
          batch: int = typer.Option(1, help="Per-GPU micro-batch."),
          seq_len: int = typer.Option(2048, help="Padded tokens per sample, visual tokens included."),
          max_pixels: int = typer.Option(451_584, help="Image pixel budget (visual tokens = pixels / 1024)."),
          images_per_sample: int = typer.Option(1, help="Images per sample at --max-pixels."),
          video_max_frames: int = typer.Option(0, help="Video frames per sample (merged in pairs)."),
          video_frame_pixels: int = typer.Option(262_144, help="Pixels per video frame."),
          lora_r: int = typer.Option(64, help="LoRA rank."),
          lora_targets: str = typer.Option("all", help="all (the LLM's linears), or a comma list of q,k,v,o,gate,up,"
                                           "down, llm (all of those), vision (the tower's blocks), merger."),
          lora_dropout: float = typer.Option(0.0, help="LoRA dropout (`qvl train`'s default 0: dropout keeps a copy "
                                             "of each adapted layer's input)."),
          tune_mm_vision: bool = typer.Option(False, help="Train the vision tower too."),
          tune_mm_mlp: bool = typer.Option(None, help="Train the merger (default: on for full, off for LoRA)."),
          tune_mm_llm: bool = typer.Option(True, help="Train the LLM (full fine-tuning)."),
          optim: str = typer.Option("adamw", help="adamw, adamw8bit (`qvl train`'s optim: adamw_8bit) or sgd."),
          master_fp32: bool = typer.Option(False, "--master-fp32", help="Full fine-tuning without ZeRO keeps "
                                                                        "fp32 trained weights (master_weights: fp32)."),
          master_bf16: bool = typer.Option(False, "--master-bf16", help="master_weights: bf16. With --zero: bf16 "
                                           "master weights, gradients and AdamW states, 8 instead of 16 B per param; "
                                           "LoRA without ZeRO: bf16 adapters, 8 B per param (or 6 with adamw8bit) "
                                           "instead of 16."),
          fused_ce: bool = typer.Option(True, "--fused-ce/--no-fused-ce", help="The loss as `qvl train` computes it "
                                        "(fused_cross_entropy, its default): logits in chunks, never tokens × "
                                        "vocabulary. --no-fused-ce: as transformers computes it."),
          host_embeddings: bool = typer.Option(False, "--host-embeddings", help="The frozen input-embedding table in "
                                               "host memory (`qvl train`'s host_embeddings; not a tied one)."),
          offload_activations: bool = typer.Option(False, "--offload-activations", help="Recomputed layers' inputs "
                                                   "in pinned host memory (`qvl train`'s activation_offloading)."),
          checkpoint_scope: str = typer.Option("layer", "--checkpoint-scope", help="layer, or mlp: recomputed "
                                               "layers keep their attention half (gradient_checkpointing_scope; "
                                               "`qvl train`'s auto picks mlp where it compiles whole layers: packed "
                                               "rows on one GPU / DDP, dense models)."),
          as_json: bool = _JSON):
    """Memory for one training step: weights, LoRA, gradients, optimizer, activations, logits; what fits."""
    from qvl.plan.memory import plan_train

    plan = plan_train(model, gpu, gpu_mem, method=method, quantization=quantization,
                      quantization_targets=quantization_targets, zero=zero, offload=offload,
                      gradient_checkpointing=gradient_checkpointing, batch=batch, seq_len=seq_len,
                      max_pixels=max_pixels, images_per_sample=images_per_sample, video_max_frames=video_max_frames,
                      video_frame_pixels=video_frame_pixels, lora_r=lora_r, lora_targets=lora_targets,
                      lora_dropout=lora_dropout, tune_mm_vision=tune_mm_vision, tune_mm_mlp=tune_mm_mlp,
                      tune_mm_llm=tune_mm_llm, optim=optim, gpus=gpus, master_fp32=master_fp32,
                      master_bf16=master_bf16, fused_ce=fused_ce, host_embeddings=host_embeddings,
                      offload_activations=offload_activations,
                      recompute_keeps_attention=_checkpoint_scope(checkpoint_scope, gradient_checkpointing, zero,
                                                                  model))
    _emit(plan, as_json)
    if not plan.fits:
        raise typer.Exit(1)


def _checkpoint_scope(scope: str, gradient_checkpointing: bool, zero: int, model: str) -> bool:
    """--checkpoint-scope -> the planner's recompute_keeps_attention; refused where `qvl train` refuses mlp."""
    from qvl.errors import QvlError
    from qvl.plan.model import resolve_model
    from qvl.train.recompute import RECOMPUTE_SCOPES

    if scope not in RECOMPUTE_SCOPES:
        raise QvlError(f"--checkpoint-scope {scope!r} is not one of {', '.join(RECOMPUTE_SCOPES)}",
                       where="--checkpoint-scope")
    if scope == "mlp" and (zero or resolve_model(model).is_moe):
        raise QvlError("--checkpoint-scope mlp is for dense models on one GPU / DDP (qvl train refuses it under ZeRO / "
                       "FSDP2 and for mixture-of-experts models)", where="--checkpoint-scope",
                       fix="--checkpoint-scope layer")
    return gradient_checkpointing and scope == "mlp"


@app.command("gpus")
def gpus_cmd():
    """List the GPUs the planner knows and the memory it assumes for each."""
    from qvl.plan.gpus import GPUS

    for g in GPUS.values():
        typer.echo(f"{g.name:14s} {g.total_gib:7.1f} GiB  {g.label}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="plan")


