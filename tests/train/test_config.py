"""Config: official names, YAML + overrides, the official --key value form, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvl.errors import QvlError
from qvl.train.config import deepspeed_config, from_argv, load_config, parse_overrides

BASE = ["model_name_or_path=m", "dataset_use=d"]


def test_official_flag_form():
    cfg = from_argv(["--model_name_or_path", "Qwen/Qwen3-VL-4B-Instruct", "--dataset_use", "a%50,b",
                     "--tune_mm_vision", "False", "--tune_mm_mlp", "True", "--tune_mm_llm", "True", "--bf16",
                     "--learning_rate", "1e-5", "--mm_projector_lr", "1e-5", "--vision_tower_lr", "1e-6",
                     "--num_train_epochs", "0.5", "--per_device_train_batch_size", "4",
                     "--gradient_accumulation_steps", "4", "--max_pixels", "50176", "--min_pixels", "784",
                     "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--weight_decay", "0",
                     "--model_max_length", "8192", "--gradient_checkpointing", "True", "--save_steps", "1000",
                     "--save_total_limit", "1", "--output_dir", "./output", "--data_flatten", "True",
                     "--eval_strategy", "no", "--per_device_eval_batch_size", "8", "--report_to", "none",
                     "--video_fps", "2", "--video_max_frames", "8", "--video_min_frames", "4",
                     "--video_max_pixels", "1304576", "--video_min_pixels", "200704", "--logging_steps", "1",
                     "--dataloader_num_workers", "4", "--max_grad_norm", "1", "--save_strategy", "steps"])
    assert cfg.bf16 and cfg.tune_mm_llm and not cfg.tune_mm_vision
    assert cfg.learning_rate == 1e-5 and cfg.vision_tower_lr == 1e-6 and cfg.num_train_epochs == 0.5
    assert cfg.data_flatten is True and "data_flatten" not in cfg.ignored  # a real key now (packed rows)
    b = cfg.vision_budget()
    assert (b.max_pixels, b.min_pixels, b.video_max_pixels, b.video_fps) == (50176, 784, 1304576, 2.0)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model_name_or_path: m\ndataset_use: d\ntune_mm_llm: true\nlearning_rate: 1.0e-4\noutput_dir: out\n")
    cfg = load_config(f, parse_overrides(["learning_rate=3e-4", "--output_dir", "elsewhere"])[1])
    assert cfg.learning_rate == 3e-4 and cfg.output_dir == "elsewhere" and cfg.tune_mm_llm


@pytest.mark.parametrize("args,key", [
    (["leraning_rate=1"], "leraning_rate"),
    (["learning_rate=abc"], "learning_rate"),
    (["bf16=true", "fp16=true"], "fp16"),
    (["tune_mm_llm=false"], "tune_mm_llm"),  # nothing trains
    (["lora_enable=true", "lora_r=0"], "lora_r"),
    (["lora_enable=true", "lora_dropout=1.5"], "lora_dropout"),
    (["lora_enable=true", "lora_targets=[llm,decoder]"], "lora_targets"),
    (["lora_enable=true", "lora_targets=[merger]", "tune_mm_llm=true"], "tune_mm_llm"),
    (["tune_mm_llm=true", "lr_scheduler_type=poly"], "lr_scheduler_type"),
    (["tune_mm_llm=true", "min_pixels=1000", "max_pixels=10"], "min_pixels"),
    (["tune_mm_llm=true", "warmup_ratio=2"], "warmup_ratio"),
    (["tune_mm_llm=true", "gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
    (["tune_mm_llm=true", "gemm_row_multiple=6"], "gemm_row_multiple"),
    (["tune_mm_llm=true", "gemm_row_multiple=-4"], "gemm_row_multiple"),
    (["tune_mm_llm=true", "gemm_row_multiple=often"], "gemm_row_multiple"),
])
def test_errors_name_the_key(args, key):
    with pytest.raises(QvlError) as e:
        from_argv(BASE + args)
    assert key in e.value.render()


def test_lr_for_frozen_component_warns():
    with pytest.warns(UserWarning, match="vision_tower_lr"):
        from_argv(BASE + ["tune_mm_llm=true", "vision_tower_lr=1e-5"])


def test_missing_required_key():
    with pytest.raises(QvlError, match="dataset_use"):
        from_argv(["model_name_or_path=m", "tune_mm_llm=true"])


def test_lora_values_kept_exactly():
    cfg = from_argv(BASE + ["lora_enable=true", "lora_r=8", "lora_alpha=16", "lora_dropout=0"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.0)


def test_lr_assignment_independent():
    cfg = from_argv(BASE + ["tune_mm_vision=true", "tune_mm_mlp=true", "tune_mm_llm=true", "vision_tower_lr=2e-6"])
    assert cfg.lr_for("vision") == cfg.lr_for("deepstack") == 2e-6
    assert cfg.lr_for("merger") == cfg.lr_for("llm") == cfg.learning_rate
    cfg = from_argv(BASE + ["tune_mm_vision=true", "tune_mm_mlp=true", "mm_projector_lr=3e-4"])
    assert cfg.lr_for("merger") == 3e-4 and cfg.lr_for("vision") == cfg.learning_rate


def test_deepspeed_offload_has_no_optimizer_and_autos_fill(tmp_path):
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "examples" / "deepspeed"
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        cfg = from_argv(BASE + ["tune_mm_llm=true", f"deepspeed={root / name}", "bf16=true",
                                "per_device_train_batch_size=2", "gradient_accumulation_steps=4"])
        ds = deepspeed_config(cfg, world_size=8, hidden_size=4096)
        assert "optimizer" not in ds and "scheduler" not in ds
        assert ds["train_batch_size"] == 64 and ds["bf16"]["enabled"] is True
        assert "auto" not in json.dumps(ds)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    cfg = from_argv(BASE + ["tune_mm_llm=true", f"deepspeed={bad}"])
    with pytest.raises(QvlError, match="optimizer"):
        deepspeed_config(cfg)


def test_cli_dry_run(tmp_path):
    from typer.testing import CliRunner

    from qvl.cli.main import app

    f = tmp_path / "c.yaml"
    f.write_text("model_name_or_path: m\ndataset_use: d\ntune_mm_llm: true\n")
    r = CliRunner().invoke(app, ["train", str(f), "learning_rate=5e-5", "--lora_r", "16", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "learning_rate: 5.0e-05" in r.output and "lora_r: 16" in r.output
    r = CliRunner().invoke(app, ["train", str(f), "lora_rr=3"])
    assert r.exit_code == 2 and "lora_rr" in r.output


def test_output_dir_may_not_be_or_hold_the_model_folder(tmp_path):
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    for out in (model, model.parent, tmp_path / "models" / "base" / "."):
        with pytest.raises(QvlError, match="model") as e:
            from_argv(["tune_mm_llm=true", f"model_name_or_path={model}", "dataset_use=d", f"output_dir={out}"])
        assert e.value.where == "output_dir"
    cfg = from_argv(["tune_mm_llm=true", f"model_name_or_path={model}", "dataset_use=d",
                     f"output_dir={tmp_path / 'models' / 'base-tuned'}"])
    assert cfg.output_dir.endswith("base-tuned")


def test_save_strategy_no_from_yaml_and_command_line(tmp_path):
    """`save_strategy: no` in YAML and `save_strategy=no` on the command line (YAML reads `no` as false)."""
    f = tmp_path / "c.yaml"
    f.write_text("model_name_or_path: m\ndataset_use: d\ntune_mm_llm: true\nsave_strategy: no\n")
    assert load_config(f).save_strategy == "no"
    assert load_config(f, parse_overrides(["save_strategy=no"])[1]).save_strategy == "no"
    assert load_config(f, parse_overrides(["save_strategy=steps"])[1]).save_strategy == "steps"


def test_cli_dry_run_plans_the_shipped_24gb_qlora_run(monkeypatch):
    """`qvl train examples/qlora_32b_24gb.yaml --dry-run` on a 24 GB card: nothing loads, the auto host-memory levers
    turn on as the run would turn them on, and the plan fits (what the YAML's header claims); on a 16 GB card it does
    not (exit code 1)."""
    from typer.testing import CliRunner

    from qvl.cli.main import app

    example = str(Path(__file__).resolve().parents[2] / "examples" / "qlora_32b_24gb.yaml")
    monkeypatch.setenv("COLUMNS", "200")
    r = CliRunner().invoke(app, ["train", example, "--dry-run", "gpu_mem=23.6GiB"])
    assert r.exit_code == 0, r.output
    assert "host_embeddings=true and activation_offloading=true (auto)" in r.output
    assert "memory preflight: fits: 23.0 GiB of 23.6 GiB" in r.output and "the data is not read" in r.output
    r = CliRunner().invoke(app, ["train", example, "--dry-run", "gpu_mem=16GiB"])
    assert r.exit_code == 1 and "does not fit" in r.output
