"""`qvl eval`: score one model, or several side by side, on a dataset split."""

from __future__ import annotations

from pathlib import Path

import typer

from qvl.cli.common import friendly


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @friendly
    def eval_(models: list[str] = typer.Argument(None, help="Checkpoints, hub ids or adapter folders (several = side by side)."),
              compare: tuple[str, str] = typer.Option(None, help="Two models to compare (same as giving both)."),
              adapter: Path = typer.Option(None, help="PEFT adapter applied to the (single) model."),
              data: str = typer.Option(..., help="Registry name(s) with optional %X, or a .json/.jsonl file."),
              registry: Path = typer.Option(None, help="Dataset registry YAML."),
              limit: int = typer.Option(0, min=0, help="Evaluate only the first N samples (0: all)."),
              batch_size: int = typer.Option(8, min=1), max_new_tokens: int = typer.Option(64, min=1),
              device: str = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if available)."),
              backend: str = typer.Option("transformers", help="transformers (alias hf), or vllm: every prompt of "
                                          "a batch in flight at once in vLLM (pass a large --batch-size)."),
              max_model_len: int = typer.Option(None, help="vLLM: context length (default: the largest that fits)."),
              out: Path = typer.Option(Path("eval_results"), help="Folder for eval.json and predictions."),
              seed: int = typer.Option(42, help="Seed for %X sampling."),
              choices: str = typer.Option(None, help="Closed-set scoring: 'auto' (the split's distinct answers, "
                                          "if at most 30) or 'a,b,c'. Each prediction is the candidate with the "
                                          "highest log-likelihood; metric choice-ll.")):
        """Greedy answers scored by match / multiple choice / number / IoU@0.5 for bbox_2d answers,
        or (--choices) closed-set: the most likely of a fixed set of answers."""
        import torch
        from rich.console import Console
        from rich.progress import Progress
        from rich.table import Table

        from qvl.data.registry import load_mixture, load_registry, parse_use, registry_path
        from qvl.errors import QvlError
        from qvl.eval.run import comparison_rows, evaluate
        from qvl.models.load import load
        from qvl.utils.fs import atomic_write_json, atomic_write_jsonl

        names = list(models or []) + [m for m in (compare or ()) if m]
        backend = {"hf": "transformers"}.get(backend, backend)
        if backend not in ("transformers", "vllm"):
            raise QvlError(f"unknown backend {backend!r}", fix="use --backend transformers (alias hf) or vllm")
        if backend == "vllm" and choices:
            raise QvlError("--choices scores answers by the model's log-likelihoods, which qvl reads with "
                           "transformers only", fix="drop --backend vllm for closed-set scoring")
        if not names:
            raise QvlError("no model given", fix="qvl eval MODEL --data NAME, or --compare BASE TUNED")
        if adapter is not None and len(names) != 1:
            raise QvlError("--adapter applies to a single model", fix="give one model, or adapter folders as models")
        need_registry = registry is not None or registry_path().is_file() or \
            not all(n.endswith((".json", ".jsonl")) for n, _ in parse_use(data))
        records = load_mixture(data, load_registry(registry) if need_registry else None, seed=seed)
        if limit:
            records = records[:limit]
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        results = []
        console = Console(stderr=True)
        for name in names:
            engine = generate = None
            if backend == "vllm":
                from qvl.eval.run import engine_generate
                from qvl.infer.engine import load_engine

                engine = load_engine(name, backend="vllm", adapter=str(adapter) if adapter else None,
                                     max_model_len=max_model_len, say=lambda m: typer.echo(m, err=True))
                model, processor, generate = None, engine.processor, engine_generate(engine)
            else:
                model, processor = load(name, device=dev, adapter=adapter)
            with Progress(console=console, transient=True) as bar:
                task = bar.add_task(f"eval {name}", total=len(records))
                results.append(evaluate(model, processor, records, name=name, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, choices=choices, generate=generate,
                                        progress=lambda n: bar.update(task, completed=n)))
            del model
            if engine is not None:
                engine.close()
        table = Table(title=f"qvl eval on {data} ({len(records)} samples)")
        table.add_column("metric")
        for r in results:
            table.add_column(r.name, justify="right")
        for row in comparison_rows(results):
            table.add_row(*row)
        Console().print(table)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "eval.json", {"data": data, "backend": backend, "choices": choices, "results": [
            {"model": r.name, "summary": r.summary, "seconds": r.seconds, "skipped": r.skipped,
             "predictions": f"predictions-{i}.jsonl"} for i, r in enumerate(results)]})
        for i, r in enumerate(results):
            atomic_write_jsonl(out / f"predictions-{i}.jsonl", ({"model": r.name, **p} for p in r.predictions))
        typer.echo(f"wrote {out / 'eval.json'} and {len(results)} predictions file(s)")
        for r in results:
            for s in r.skipped[:5]:
                typer.echo(f"skipped {s}")
