"""The planner's vLLM KV budget against real vLLM start-up logs (tests/plan/vllm_logs.json).

Every 'modelled' case: the available KV cache predicted within 15 % of the logged value (0.5 GiB when the
logged value is under 4 GiB), and every logged failure predicted as "does not fit". The table in docs/plan.md
is this file's output (``python tests/plan/test_vllm_logs.py`` prints it); a test keeps the two equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvl.plan.gpus import GIB, Gpu
from qvl.plan.memory import plan_serve
from qvl.plan.model import from_dims, resolve_model

HERE = Path(__file__).resolve().parent
DATA = json.loads((HERE / "vllm_logs.json").read_text())
DOC = HERE.parents[1] / "docs" / "plan.md"
MODELLED = [c for c in DATA["cases"] if c["status"] == "modelled"]
REL_TOL, ABS_TOL_GIB, SMALL_GIB = 0.15, 0.5, 4.0


def shape(case: dict):
    name = case["shape"]
    if name.startswith("qwen3-vl:"):
        return resolve_model(name.split(":", 1)[1])
    return from_dims(case["model"], **DATA["shapes"][name])


def predict(case: dict):
    s = {**case.get("assumed", {}), **case["settings"]}
    return plan_serve(case["model"], _shape=shape(case), _gpu=Gpu("logged", case["card_gib"], case["card"]),
                      backend="vllm", gpu_memory_utilization=s.get("gpu_memory_utilization", 0.9),
                      max_model_len=s.get("max_model_len"), max_num_seqs=s.get("max_num_seqs"),
                      max_num_batched_tokens=s.get("max_num_batched_tokens"), gpus=s.get("tensor_parallel_size", 1),
                      image_tokens=s.get("image_tokens"),
                      enforce_eager=s.get("enforce_eager", False), vllm_version=case["vllm_version"],
                      vllm_engine=case["engine"], recommend=False)


def compared(case: dict) -> str:
    """The logged figure a case is checked on: the available KV cache, or (a log without it) the profiling peak."""
    return case.get("compare", "kv_available_gib")


def predicted(case: dict, plan) -> float:
    return plan.parts["vLLM profiling peak"] if compared(case) == "activation_peak_gib" else plan.kv_available_gib


def within(predicted: float, logged: float) -> bool:
    if logged < SMALL_GIB:
        return abs(predicted - logged) <= ABS_TOL_GIB
    return abs(predicted - logged) <= REL_TOL * logged


def failed(case: dict) -> bool:
    return case["outcome"].startswith("failed")


# outcome-only cases (no KV figure logged) are checked by test_outcome_matches_the_log alone
WITH_FIGURE = [c for c in MODELLED if c["logged"].get(compared(c)) is not None]


@pytest.mark.parametrize("case", WITH_FIGURE, ids=[c["id"] for c in WITH_FIGURE])
def test_available_kv_within_tolerance(case):
    logged = case["logged"][compared(case)]
    value = predicted(case, predict(case))
    assert within(value, logged), \
        f"{case['id']}: {compared(case)} predicted {value:.2f} GiB, logged {logged:.2f} GiB ({case['source']})"


@pytest.mark.parametrize("case", MODELLED, ids=[c["id"] for c in MODELLED])
def test_outcome_matches_the_log(case):
    p = predict(case)
    if failed(case):
        assert not p.fits and "does not fit" in p.verdict, f"{case['id']}: logged {case['outcome']}, planned {p.verdict}"
    else:
        assert p.fits, f"{case['id']}: logged {case['outcome']}, planned {p.verdict}"


@pytest.mark.parametrize("case", [c for c in MODELLED if "weights_gib" in c["logged"]], ids=lambda c: c["id"])
def test_weights_from_the_shape_match_model_loading(case):
    # the parameter count from the config's dimensions (no per-case number) against vLLM's own "weights take"
    p = predict(case)
    assert p.parts["weights"] == pytest.approx(case["logged"]["weights_gib"], rel=0.02)


def test_every_case_has_a_source_and_a_reason_when_not_modelled():
    ids = [c["id"] for c in DATA["cases"]]
    assert len(ids) == len(set(ids))
    for c in DATA["cases"]:
        assert c["source"].startswith("https://github.com/"), c["id"]
        assert c["status"] in ("modelled", "not_modelled"), c["id"]
        assert c["status"] == "modelled" or c.get("reason"), c["id"]


def test_the_verdict_states_the_margin():
    p = predict(MODELLED[0])
    assert p.kv_margin_gib and p.kv_margin_gib > 0.3
    assert f"≈ {p.kv_available_gib:.1f} ± {p.kv_margin_gib:.1f} GiB" in p.verdict


@pytest.mark.parametrize("version,engine,name", [
    ("0.6.4", None, "V0"), ("0.10.1", "v0", "V0"), ("0.8.5.post1", None, "0.8 – 0.9.0"), ("v0.11.0", None, "0.9.1 – 0.16"),
    ("0.17.0", None, "0.17 – 0.20"), ("0.21.0", None, ">= 0.21"), (None, None, ">= 0.21"), ("nightly", None, ">= 0.21")])
def test_each_vllm_version_gets_its_accounting(version, engine, name):
    from qvl.plan.vllm import accounting_for

    assert name in accounting_for(version, engine).name


def test_version_changes_move_the_kv_budget_the_way_the_logs_do():
    # the v0.17 sampler rework frees KV (Qwen3-14B: 41.94 -> 45.34 GiB logged); >= 0.21 takes the CUDA graphs
    old, new, graphs = (plan_serve("8B", "h100", vllm_version=v, recommend=False) for v in ("0.16.0", "0.17.0", "0.21.0"))
    assert new.kv_available_gib > old.kv_available_gib
    assert graphs.kv_available_gib == pytest.approx(new.kv_available_gib - graphs.parts["CUDA graphs"])


def test_vision_encoder_profile_is_not_split_by_tensor_parallel():
    one, two = (plan_serve("8B", "h100", gpus=g, max_num_seqs=8, recommend=False) for g in (1, 2))
    assert "vision encoder" in one.notes["vLLM profiling peak"].split(":")[-1]
    assert two.parts["vLLM profiling peak"] == pytest.approx(one.parts["vLLM profiling peak"])


def test_skipping_the_encoder_profile_frees_kv_and_warns():
    kw = dict(max_model_len=32768, recommend=False)
    full, skipped = plan_serve("8B", "rtx5090", **kw), plan_serve("8B", "rtx5090", skip_mm_profiling=True, **kw)
    assert skipped.kv_available_gib > full.kv_available_gib
    assert any("no vision-encoder profile" in w for w in skipped.warnings) and not full.warnings


def test_doc_table_is_generated_from_the_logs():
    assert table() in DOC.read_text(), "docs/plan.md is stale: paste the output of python tests/plan/test_vllm_logs.py"


def _link(case: dict) -> str:
    parts = case["source"].removeprefix("https://github.com/").split("/")
    repo = "/".join(parts[:2])
    label = f"{repo} {parts[-1]}" if "blob" in parts else f"{repo}#{parts[-1]}"
    return f"[{label}]({case['source']})"


def table() -> str:
    """The markdown tables of docs/plan.md: modelled cases (logged vs predicted) and the cases not modelled."""
    rows = ["| case | model | card × TP | vLLM | logged | predicted | error | logged outcome → plan |",
            "|---|---|---|---|---|---|---|---|"]
    for c in MODELLED:
        p = predict(c)
        s = {**c.get("assumed", {}), **c["settings"]}
        logged = c["logged"].get(compared(c))
        value = predicted(c, p)
        what = "peak" if compared(c) == "activation_peak_gib" else "KV"
        err = "–" if logged is None else (f"{value - logged:+.2f} GiB" if logged < SMALL_GIB else
                                           f"{(value - logged) / logged:+.1%}")
        margin = f" ± {p.kv_margin_gib:.2f}" if what == "KV" else ""
        outcome = ("fails" if failed(c) else "starts") + " → " + ("does not fit" if not p.fits else "fits")
        rows.append(f"| {c['id']} ({_link(c)}) | {c['model']} | {c['card']} × {s.get('tensor_parallel_size', 1)} | "
                    f"{c['vllm_version'].split(' ')[0]} {c['engine'].upper()} | "
                    f"{'–' if logged is None else f'{what} {logged:.2f} GiB'} | "
                    f"{what} {value:.2f}{margin} GiB | {err} | {outcome} |")
    rows += ["", "| case (not modelled) | model | logged | why not |", "|---|---|---|---|"]
    for c in DATA["cases"]:
        if c["status"] == "modelled":
            continue
        kv = c["logged"].get("kv_available_gib")
        kv = "–" if kv is None else (", ".join(f"{x:.2f}" for x in kv) if isinstance(kv, list) else f"{kv:.2f}")
        rows.append(f"| {c['id']} ({_link(c)}) | {c['model']} | KV {kv} GiB; {c['outcome']} | {c['reason']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
