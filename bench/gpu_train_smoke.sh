#!/usr/bin/env bash
# `qvl train` on the H100 with the 8B shape (random weights) on the benchmark workload, padded vs
# packed (data_flatten), through the real CLI. Writes the run logs' last lines; run from the repo root:
#   bash bench/gpu_train_smoke.sh [STEPS]
set -euo pipefail
STEPS=${1:-10}
export HF_HUB_OFFLINE=1
Q=(python3 -c "from qvl.cli.main import app; app()")
python3 - <<'PY'
import torch, sys
sys.path.insert(0, "bench")
from pathlib import Path
from qvl.models.build import random_model, _save
from workload import make_workload
if not Path("/tmp/m8b/config.json").exists():
    model, processor = random_model("8B", dtype=torch.bfloat16, device="cuda")
    _save(model, processor, Path("/tmp/m8b"))
    del model
make_workload(Path("/tmp/wl"), n=512, seed=0)
Path("/tmp/wl/datasets.yaml").write_text("workload:\n  annotation_path: workload.jsonl\n  data_path: .\n")
print("model and workload ready")
PY
for mode in ${MODES:-padded flatten}; do
  extra=""
  case $mode in flatten) extra="data_flatten=true";; flatten-sdpa) extra="data_flatten=true packed_attention=sdpa";;
    flatten-sdpa-w4) extra="data_flatten=true packed_attention=sdpa dataloader_num_workers=4";;
    flatten-sdpa-w4-qkvo) extra="data_flatten=true packed_attention=sdpa dataloader_num_workers=4 lora_target_regex=.*language_model\\.layers\\.[0-9]+\\.self_attn\\.[qkvo]_proj";; esac
  "${Q[@]}" train examples/lora_8b_24gb.yaml model_name_or_path=/tmp/m8b dataset_registry=/tmp/wl/datasets.yaml \
    dataset_use=workload max_steps=$STEPS output_dir=/tmp/run-$mode save_steps=1000 logging_steps=1 \
    per_device_train_batch_size=4 gradient_accumulation_steps=1 max_pixels=1433600 model_max_length=4096 \
    $extra 2>&1 | grep -E "^(step|done|data|model|memory|error|fix)" | tail -${TAIL:-8} || true
done
