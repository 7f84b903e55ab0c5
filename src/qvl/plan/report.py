"""Render a Plan for people (a rich table) or machines (one JSON object)."""

from __future__ import annotations

import json

from qvl.plan.memory import Plan


def to_json_text(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=2, ensure_ascii=False)


def render(plan: Plan, console=None) -> None:
    """Print the parts table, the verdict and the recommendations."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = plan.settings
    name = f"Qwen3-VL-{plan.model}" if "/" not in plan.model and not plan.model.endswith(".json") else plan.model
    if plan.mode == "serve":
        title = (f"qvl plan serve: {name} on {plan.gpus}× {plan.gpu} ({plan.gpu_total_gib:.1f} GiB), "
                 f"{s['backend']}, max_model_len {s['max_model_len']:,}")
    else:
        title = (f"qvl plan train: {name} {s['method']} on {plan.gpus}× {plan.gpu} "
                 f"({plan.gpu_total_gib:.1f} GiB), batch {s['batch']} × {s['seq_len']:,} tokens")
    t = Table(title=title, title_justify="left")
    t.add_column("part")
    t.add_column("GiB / GPU", justify="right")
    t.add_column("how it is counted", overflow="fold")
    for name, gib in plan.parts.items():
        t.add_row(name, f"{gib:.2f}", plan.notes.get(name, ""))
    t.add_row("[bold]total[/bold]", f"[bold]{plan.total_gib:.2f}[/bold]", f"of {plan.gpu_total_gib:.1f} GiB")
    console.print(t)
    console.print(f"KV cache per token: {plan.kv_bytes_per_token:,} bytes "
                  f"({plan.kv_bytes_per_token / 1024:.0f} KiB)" +
                  (f"; one {s['max_model_len']:,}-token sequence needs {plan.kv_needed_gib:.2f} GiB"
                   if plan.kv_needed_gib is not None else ""))
    if plan.kv_available_gib is not None:
        console.print(f"vLLM KV cache available: {plan.kv_estimate} ({s.get('vllm_accounting', 'vLLM')}; the margin is "
                      "the spread of the start-up logs behind each term, docs/plan.md)")
    if plan.mode == "serve":
        console.print(f"largest max_model_len that fits: {plan.max_model_len_that_fits or 0:,}")
    else:
        console.print(f"largest batch that fits (at seq-len {s['seq_len']:,}): {plan.max_batch_that_fits or 0}; "
                      f"largest seq-len that fits (at batch {s['batch']}): {plan.max_seq_len_that_fits or 0:,}")
        if plan.cpu_ram_gib:
            console.print(f"host RAM for what is offloaded (states, weights, layer inputs): {plan.cpu_ram_gib:.1f} GiB "
                          "per GPU")
    color = "green" if plan.fits else "red"
    console.print(f"[bold {color}]{plan.verdict}[/bold {color}]")
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if plan.recommendations:
        console.print("recommendations:")
        for r in plan.recommendations:
            console.print(f"  - {r.text}", markup=False, highlight=False)
