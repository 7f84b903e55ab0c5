"""What eager CUDA kernel loading costs at start-up: time and GPU memory of a fresh process that initialises CUDA
and runs one bf16 matmul, with CUDA_MODULE_LOADING=LAZY (torch's default, which qvl train keeps) and EAGER
(``bench/train_throughput.py --eager-kernels``). Each mode runs in its own process (the setting is read when CUDA
starts).

    python bench/kernel_loading.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, time, torch
t0 = time.perf_counter()
free0, total = torch.cuda.mem_get_info()
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
(a @ a).sum().item()
free1, _ = torch.cuda.mem_get_info()
print(json.dumps({"start_s": time.perf_counter() - t0, "used_gib": (total - free1) / 2**30}))
"""


def main() -> None:
    out = {}
    for mode in ("LAZY", "EAGER"):
        env = dict(os.environ, CUDA_MODULE_LOADING=mode)
        res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{mode:5s}: CUDA start + one matmul {out[mode]['start_s']:.1f} s, GPU memory in use "
              f"{out[mode]['used_gib']:.2f} GiB", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
