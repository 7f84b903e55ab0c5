"""`qvl train CONFIG.yaml [key=value ...]`: fine-tune Qwen3-VL (LoRA or full) with exact component control."""

from __future__ import annotations

from pathlib import Path

import typer

from qvl.cli.main import friendly


def register(app: typer.Typer) -> None:
    @app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    @friendly
    def train(ctx: typer.Context,
              config: Path = typer.Argument(..., help="YAML config (see examples/*.yaml)."),
              dry_run: bool = typer.Option(False, "--dry-run", help="Check the config, print it and its memory plan "
                                           "on the card (gpu_mem=24GiB or QVL_GPU=rtx4090 names one); train nothing.")):
        """Train as CONFIG.yaml says. Any key can be overridden: `key=value` or `--key value`.

        Re-running the same command resumes from the newest complete checkpoint in output_dir;
        `resume=false` starts fresh (old files are moved to output_dir/previous/, never deleted).
        A memory preflight runs before the model loads and stops a run that will not fit (numbers + fix);
        `--force` trains anyway. `data_flatten=true` / `data_packing=true` train on packed rows.
        Several GPUs: `nproc=N` (re-launches under torchrun); `deepspeed=examples/deepspeed/zero3.json`
        or `fsdp=full_shard` choose the engine (docs/train.md, "Several GPUs").
        """
        import yaml

        from qvl.train.config import load_config, parse_overrides

        positional, overrides = parse_overrides(list(ctx.args))
        if positional:
            from qvl.errors import QvlError

            raise QvlError(f"unexpected argument(s) {positional}", fix="overrides look like key=value or --key value")
        cfg = load_config(config, overrides)
        if dry_run:  # the config as it will run, then its memory plan on the card (nothing loads)
            typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
            from qvl.train.preflight import dry_run as plan_dry_run

            typer.echo("")
            pf = plan_dry_run(cfg, say=typer.echo)
            if pf is not None and pf.plan is not None:
                from qvl.plan.report import render

                render(pf.plan)
                if not pf.plan.fits:
                    raise typer.Exit(1)
            return
        from qvl.train import distributed

        if distributed.needs_launch(cfg):
            distributed.relaunch([str(config), *ctx.args], cfg.nproc, say=typer.echo)
        from qvl.train.loop import train as run

        finished, owned = False, distributed.owns_process()
        try:
            run(cfg, log=typer.echo)
            finished = True
        finally:
            distributed.end_group(finished, exit_after=owned)
