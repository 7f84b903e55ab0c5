"""What eager CUDA kernel loading costs at start-up: time and GPU memory of a fresh process that initialises CUDA
and runs one bf16 matmul, with CUDA_MODULE_LOADING=LAZY (torch's default, which qvl train keeps) and EAGER
(``bench/train_throughput.py --eager-kernels``). Each mode runs in its own process (the setting is read when CUDA
starts).

And whether a matmul of a shape not met before holds the host until the GPU is idle (a kernel loaded at its first
launch waits for the device): the GPU is kept busy (``torch.cuda._sleep``, ~0.1 s), then one matmul of a new M is
launched and its host time taken. Shapes as the tower's and the loss head's (M varies every step there): bf16
``addmm`` (M x 1152) @ (1152 x 4304) + bias and ``mm`` (M x 4096) @ (4096 x 4096). Three passes: new Ms, the same Ms
again, then new Ms between those of the first pass (does meeting a grid of Ms load what its neighbours use?).

    python bench/experiments/kernel_loading.py
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


STALLS = """
import json, time, torch
dev = torch.device("cuda")
w1, b1 = torch.randn(4304, 1152, device=dev, dtype=torch.bfloat16), torch.randn(4304, device=dev, dtype=torch.bfloat16)
w2 = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
xs1, xs2 = torch.randn(20000, 1152, device=dev, dtype=torch.bfloat16), torch.randn(20000, 4096, device=dev, dtype=torch.bfloat16)
torch.addmm(b1, xs1[:1024], w1.t()); xs2[:1024] @ w2.t(); torch.cuda.synchronize()

def held(fn):
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the GPU busy for ~0.1 s
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t

out = {}
for name, ms in (("new", [1000 + 331 * i for i in range(30)]), ("again", [1000 + 331 * i for i in range(30)]),
                 ("between", [1165 + 331 * i for i in range(30)])):
    times = []
    for m in ms:
        times.append(held(lambda: torch.addmm(b1, xs1[:m], w1.t())))
        times.append(held(lambda: xs2[:m] @ w2.t()))
    out[name] = {"launches": len(times), "held_over_50ms": sum(t > 0.05 for t in times),
                 "max_ms": max(times) * 1e3, "median_ms": sorted(times)[len(times) // 2] * 1e3}
print(json.dumps(out))
"""


def main() -> None:
    out = {}
    for mode in ("LAZY", "EAGER"):
        env = dict(os.environ, CUDA_MODULE_LOADING=mode)
        res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{mode:5s}: CUDA start + one matmul {out[mode]['start_s']:.1f} s, GPU memory in use "
              f"{out[mode]['used_gib']:.2f} GiB", flush=True)
    for mode in ("LAZY", "EAGER"):
        env = dict(os.environ, CUDA_MODULE_LOADING=mode)
        res = subprocess.run([sys.executable, "-c", STALLS], env=env, capture_output=True, text=True, check=True)
        out[f"{mode}_new_shapes"] = passes = json.loads(res.stdout.strip().splitlines()[-1])
        for name, r in passes.items():
            print(f"{mode:5s}: {name:8s} Ms: {r['held_over_50ms']:2d} of {r['launches']} matmul launches held the host "
                  f"until the GPU was idle (> 50 ms; median {r['median_ms']:.2f} ms, max {r['max_ms']:.0f} ms)",
                  flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
