"""`qvl infer`, `qvl chat`, `qvl serve`, `qvl merge`: use a model (base, +adapter, or merged)."""

from __future__ import annotations

from pathlib import Path

import typer

from qvl.cli.main import friendly

_MODEL_HELP = "Checkpoint folder or hub id (Qwen/Qwen3-VL-8B-Instruct)."


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _engine(model, backend, adapter, cpu_only, device, dtype, flash_attn2, max_model_len, max_new_tokens,
            gpu_memory_utilization=0.9, tensor_parallel_size=None, limit_mm_per_prompt=None, name=None,
            max_batch_size=None, kv_cache_gib=None, decode="auto", vision_cache_mb=None):
    from qvl.errors import QvlError
    from qvl.infer.engine import load_engine

    if not model:
        raise QvlError("no model given", fix="pass --model PATH_OR_HUB_ID (or -c/--checkpoint-path)")
    backend = {"hf": "transformers"}.get(backend, backend)
    if cpu_only:
        if backend == "vllm":
            raise QvlError("--cpu-only works with the transformers backend only", fix="drop --backend vllm")
        device = "cpu"
    if max_batch_size is None:  # concurrent requests: continuous batching pays off most on a GPU
        import torch

        on_gpu = torch.cuda.is_available() and not str(device or "").startswith("cpu")
        max_batch_size = 32 if on_gpu else 8
    if decode not in ("auto", "fast", "generate"):
        raise QvlError(f"--decode {decode!r} is not a choice", fix="use auto, fast or generate")
    if backend == "transformers" and not str(device or "").startswith("cpu"):
        from qvl.infer.preflight import check_serve

        check_serve(model, backend="transformers", max_model_len=max_model_len, max_num_seqs=max_batch_size,
                    say=_say, sized_cache=decode != "generate")  # prints the verdict; a warning, never a refusal
    _say(f"loading {model}{f' + adapter {adapter}' if adapter else ''} ({backend}) ...")
    return load_engine(model, backend=backend, adapter=str(adapter) if adapter else None, device=device, dtype=dtype,
                       flash_attn2=flash_attn2, max_model_len=max_model_len, max_new_tokens=max_new_tokens,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       limit_mm_per_prompt=limit_mm_per_prompt, name=name, max_batch_size=max_batch_size, say=_say,
                       kv_cache_gib=kv_cache_gib, fast={"auto": None, "fast": True, "generate": False}[decode],
                       vision_cache_mb=vision_cache_mb)


def _sampling(engine, temperature, top_p, top_k, presence_penalty, seed, max_new_tokens):
    return engine.sampling(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                           seed=seed, max_new_tokens=max_new_tokens)


def _media(kind: str, path: str):
    from qvl.data.samples import Media
    from qvl.errors import QvlError

    p = Path(path).expanduser()
    if not p.is_file():
        raise QvlError(f"{kind} file not found: {path}")
    return Media(kind, str(p.resolve()))


def _stream(engine, request) -> str:
    from qvl.errors import QvlError
    from qvl.infer.engine import RequestError

    try:
        handle = engine.stream(request)
    except RequestError as e:
        raise QvlError(e.what, fix=e.fix) from None
    parts = []
    try:
        for chunk in handle:
            if chunk.text:
                parts.append(chunk.text)
                typer.echo(chunk.text, nl=False)
            if chunk.finish_reason == "error":
                raise QvlError(f"generation failed: {chunk.error}")
    except KeyboardInterrupt:
        handle.cancel()
    typer.echo("")
    return "".join(parts)


def register(app: typer.Typer) -> None:
    @app.command("infer")
    @friendly
    def infer(question: str = typer.Argument(..., help="The question (text of the user turn)."),
              model: str = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
              image: list[str] = typer.Option([], "--image", help="Image file (repeatable)."),
              video: list[str] = typer.Option([], "--video", help="Video file (repeatable)."),
              system: str = typer.Option(None, help="System prompt."),
              adapter: Path = typer.Option(None, help="LoRA adapter folder to apply on the base model."),
              backend: str = typer.Option("transformers", help="transformers (alias hf) or vllm."),
              device: str = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if available)."),
              cpu_only: bool = typer.Option(False, "--cpu-only", help="Same as --device cpu."),
              dtype: str = typer.Option(None, help="bfloat16 / float16 / float32 (default: bf16 on GPU, fp32 on CPU)."),
              flash_attn2: bool = typer.Option(False, "--flash-attn2", help="Use flash_attention_2."),
              max_new_tokens: int = typer.Option(None, help="Most tokens to generate (default 1024)."),
              temperature: float = typer.Option(None, help="0 = greedy. Default: the model's recommendation."),
              top_p: float = typer.Option(None), top_k: int = typer.Option(None),
              presence_penalty: float = typer.Option(None),
              seed: int = typer.Option(None, help="Seed for reproducible sampling.")):
        """Answer one question about images/videos; the answer streams to stdout."""
        from qvl.data.samples import Message
        from qvl.infer.types import Request

        parts = [_media("image", p) for p in image] + [_media("video", p) for p in video] + [question]
        engine = _engine(model, backend, adapter, cpu_only, device, dtype, flash_attn2, None, None, max_batch_size=1)
        messages = ([Message("system", [system])] if system else []) + [Message("user", parts)]
        try:
            _stream(engine, Request(messages, _sampling(engine, temperature, top_p, top_k, presence_penalty, seed,
                                                        max_new_tokens)))
        finally:  # the worker ends before the process does
            engine.close()

    @app.command("chat")
    @friendly
    def chat(model: str = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
             system: str = typer.Option(None, help="System prompt."),
             adapter: Path = typer.Option(None, help="LoRA adapter folder to apply on the base model."),
             backend: str = typer.Option("transformers", help="transformers (alias hf) or vllm."),
             device: str = typer.Option(None), cpu_only: bool = typer.Option(False, "--cpu-only"),
             dtype: str = typer.Option(None), flash_attn2: bool = typer.Option(False, "--flash-attn2"),
             max_new_tokens: int = typer.Option(None), temperature: float = typer.Option(None),
             top_p: float = typer.Option(None), top_k: int = typer.Option(None),
             presence_penalty: float = typer.Option(None), seed: int = typer.Option(None)):
        """Multi-turn chat in the terminal. /image PATH, /video PATH attach media; /reset; /quit."""
        from qvl.data.samples import Message
        from qvl.errors import QvlError
        from qvl.infer.types import Request

        engine = _engine(model, backend, adapter, cpu_only, device, dtype, flash_attn2, None, None, max_batch_size=1)
        sampling = _sampling(engine, temperature, top_p, top_k, presence_penalty, seed, max_new_tokens)
        base = [Message("system", [system])] if system else []
        history, attached = list(base), []
        typer.echo(f"{engine.describe()}\n/image PATH, /video PATH attach to the next message; /reset; /quit")
        try:
            while True:
                try:
                    line = input("you> ")
                except (EOFError, KeyboardInterrupt):
                    typer.echo("")
                    return
                line = line.strip()
                if not line:
                    continue
                cmd, _, arg = line.partition(" ")
                if cmd in ("/quit", "/exit"):
                    return
                if cmd == "/reset":
                    history, attached = list(base), []
                    typer.echo("(conversation cleared)")
                    continue
                if cmd in ("/image", "/video"):
                    try:
                        attached.append(_media(cmd[1:], arg.strip()))
                        typer.echo(f"(attached {cmd[1:]} {arg.strip()})")
                    except QvlError as e:
                        typer.secho(f"error: {e.render()}", fg=typer.colors.RED, err=True)
                    continue
                if cmd.startswith("/"):
                    typer.echo("commands: /image PATH, /video PATH, /reset, /quit")
                    continue
                user = Message("user", attached + [line])
                typer.echo("qvl> ", nl=False)
                try:
                    answer = _stream(engine, Request(history + [user], sampling))
                except QvlError as e:  # a bad image or an over-long conversation: keep chatting
                    typer.secho(f"error: {e.render()}", fg=typer.colors.RED, err=True)
                    continue
                history += [user, Message("assistant", [answer])]
                attached = []
        finally:  # the worker ends before the process does
            engine.close()

    @app.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
    @friendly
    def serve(model: str = typer.Option(None, "--model", "-m", "-c", "--checkpoint-path", help=_MODEL_HELP),
              host: str = typer.Option("127.0.0.1", "--host", "--server-name",
                                       help="Address to bind (127.0.0.1: this machine only)."),
              port: int = typer.Option(7860, "--port", "--server-port"),
              api_key: str = typer.Option(None, "--api-key", envvar="QVL_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (API and web chat)."),
              backend: str = typer.Option("transformers", help="transformers (alias hf) or vllm."),
              adapter: Path = typer.Option(None, help="LoRA adapter folder served on the base model."),
              device: str = typer.Option(None), cpu_only: bool = typer.Option(False, "--cpu-only"),
              dtype: str = typer.Option(None), flash_attn2: bool = typer.Option(False, "--flash-attn2"),
              max_model_len: int = typer.Option(None, help="Context length (default: the model's; vLLM: the "
                                                           "largest that fits)."),
              gpu_memory_utilization: float = typer.Option(0.9, help="vLLM: share of GPU memory to use."),
              tensor_parallel_size: int = typer.Option(None, help="vLLM: GPUs (default: all visible)."),
              limit_mm_per_prompt: str = typer.Option(None, help="Most media per request, e.g. image=8,video=2."),
              max_new_tokens: int = typer.Option(None, help="Default max_tokens of a request (1024)."),
              max_batch_size: int = typer.Option(None, help="transformers: most requests generated together "
                                                            "(KV-cache slots; default 32 on a GPU, 8 on CPU)."),
              kv_cache_gib: float = typer.Option(None, help="transformers: memory for the KV cache (default: "
                                                            "the free GPU memory less 4 GiB; CPU: up to 4 GiB)."),
              decode: str = typer.Option("auto", help="transformers: fast (slot KV cache, CUDA graphs, continuous "
                                                      "batching), generate (model.generate), or auto."),
              vision_cache_mb: float = typer.Option(None, help="transformers: memory for vision-encoder outputs "
                                                               "kept for later chat turns, so a turn that re-sends "
                                                               "an image does not encode it again (default 1024 on "
                                                               "a GPU, 256 on CPU; 0: off, and processed images "
                                                               "are not kept either)."),
              allowed_media_dir: Path = typer.Option(None, help="Allow local file paths under this folder."),
              no_remote_media: bool = typer.Option(False, "--no-remote-media", help="Refuse http(s) media URLs."),
              allow_private_media_urls: bool = typer.Option(
                  False, "--allow-private-media-urls",
                  help="Also fetch http(s) media from loopback/private/link-local hosts (off: SSRF protection)."),
              max_body_mb: float = typer.Option(64.0, help="Largest request body."),
              preprocess_threads: int = typer.Option(2, min=1, help="Requests preprocessed at once (chat "
                                                                    "template, tokenizer, image processor) in the "
                                                                    "server's process."),
              preprocess_workers: int = typer.Option(0, min=0, help="transformers: worker processes preparing "
                                                                    "requests, off the engine's interpreter (0: in "
                                                                    "the server's process; not yet measured on a "
                                                                    "GPU, docs/serve.md)."),
              served_model_name: str = typer.Option(None, help="Model id in /v1 (default: folder name/hub id)."),
              share: bool = typer.Option(False, "--share", help="Accepted for web_demo_mm.py compatibility."),
              inbrowser: bool = typer.Option(False, "--inbrowser", help="Open the chat page in a browser.")):
        """OpenAI-compatible API (/v1) + web chat (/) on one port. Accepts web_demo_mm.py's flags."""
        from qvl.serve.app import ServeSettings, parse_limits, run_server

        settings = ServeSettings(
            host=host, port=port, api_key=api_key or None,
            allowed_media_dir=str(allowed_media_dir) if allowed_media_dir else None, max_body_mb=max_body_mb,
            limit_mm_per_prompt=parse_limits(limit_mm_per_prompt), allow_remote_media=not no_remote_media,
            allow_private_media_urls=allow_private_media_urls, preprocess_threads=preprocess_threads,
            preprocess_workers=preprocess_workers,
            served_model_name=served_model_name, inbrowser=inbrowser, share=share)
        engine = _engine(model, backend, adapter, cpu_only, device, dtype, flash_attn2, max_model_len, max_new_tokens,
                         gpu_memory_utilization, tensor_parallel_size, settings.limit_mm_per_prompt,
                         served_model_name, max_batch_size, kv_cache_gib, decode, vision_cache_mb)
        run_server(engine, settings, say=typer.echo)

    @app.command("merge")
    @friendly
    def merge(base: str = typer.Option(..., help="Base checkpoint the adapter was trained on."),
              adapter: Path = typer.Option(..., help="LoRA adapter folder."),
              out: Path = typer.Option(..., help="Folder to write (must not exist or be empty)."),
              dtype: str = typer.Option(None, help="Weights dtype (default: the base checkpoint's)."),
              device: str = typer.Option(None, help="Where to merge (default cpu)."),
              overwrite: bool = typer.Option(False, help="Replace a non-empty --out (only once the new one is complete)."),
              no_verify: bool = typer.Option(False, "--no-verify", help="Skip the reload-and-compare check.")):
        """Merge a LoRA adapter into its base: weights + processor, tokenizer, chat template, generation config."""
        import torch

        from qvl.infer.merge import merge_adapter

        report = merge_adapter(base, adapter, out, dtype=getattr(torch, dtype) if dtype else None,
                               overwrite=overwrite, verify=not no_verify, device=device, say=_say)
        typer.echo(f"merged {adapter} into {base} -> {report.path} ({len(report.files)} files)")
        if report.max_abs_diff is not None:
            typer.echo(f"verified: max |logit diff| merged vs base+adapter = {report.max_abs_diff:.2e} "
                       f"(tolerance {report.tolerance:.1e}), same next token: {report.same_argmax}")
