import json
import subprocess
import sys

import pytest

from qvl.data.registry import load_mixture, load_registry, parse_use, sample_indices
from qvl.errors import QvlError


@pytest.fixture
def registry(tmp_path):
    (tmp_path / "anns").mkdir()
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(50)]
    (tmp_path / "anns" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "anns" / "b.json").write_text(json.dumps(rows[:10]))
    (tmp_path / "datasets.yaml").write_text(
        "a:\n  annotation_path: anns/a.jsonl\n  data_path: media\nb:\n  annotation_path: anns/b.json\n")
    return tmp_path / "datasets.yaml"


def test_paths_resolve_relative_to_the_yaml_file(registry):
    reg = load_registry(registry)
    assert reg["a"].annotation_path == registry.parent / "anns" / "a.jsonl"
    assert reg["a"].data_path == registry.parent / "media"
    assert reg["b"].data_path == registry.parent / "anns"  # default: the annotation's folder


def test_parse_use():
    assert parse_use("a%50, b") == [("a", 50.0), ("b", 100.0)]
    assert parse_use("x%250") == [("x", 250.0)]
    with pytest.raises(QvlError):
        parse_use("a%0")


def test_sampling_is_seeded_and_repeats_above_100():
    assert sample_indices(50, 20, 1, "a") == sample_indices(50, 20, 1, "a")
    assert sample_indices(50, 20, 1, "a") != sample_indices(50, 20, 2, "a")
    assert len(sample_indices(50, 20, 1, "a")) == 10
    over = sample_indices(10, 250, 0, "b")
    assert len(over) == 25 and all(over.count(i) >= 2 for i in range(10))


def test_mixture_identical_across_processes(registry):
    """Every rank of a multi-GPU run must draw the same samples: check in a fresh interpreter."""
    code = ("import json,sys; from qvl.data.registry import load_mixture, load_registry;"
            f"r=load_mixture('a%30,b%150', load_registry({str(registry)!r}), seed=3);"
            "print(json.dumps([x.origin for x in r]))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(s), "PATH": ""}).stdout for s in (0, 1)}
    assert len(outs) == 1
    here = [x.origin for x in load_mixture("a%30,b%150", load_registry(registry), seed=3)]
    assert json.loads(outs.pop()) == here
    assert len(here) == 15 + 15


def test_errors_name_the_problem(registry, tmp_path):
    with pytest.raises(QvlError, match="unknown dataset 'nope'"):
        load_mixture("nope", load_registry(registry))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(QvlError, match="line 2"):
        load_mixture(str(bad), None)
    with pytest.raises(QvlError, match="not found"):
        load_registry(tmp_path / "missing.yaml")


def test_a_file_path_works_as_a_dataset(registry):
    recs = load_mixture(str(registry.parent / "anns" / "b.json"), None)
    assert len(recs) == 10 and recs[0].data_path == registry.parent / "anns"
