import json

from typer.testing import CliRunner

from qvl.cli.main import app
from qvl.data.check import check_records
from qvl.data.registry import load_mixture, load_registry
from qvl.data.synth import make_shapes


def test_pack_places_every_sample_exactly_once(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path / "cache"))
    ds = tmp_path / "shapes"
    make_shapes(ds, n=60, val_fraction=0.1, n_videos=2, seed=1)
    out = tmp_path / "packed.jsonl"
    res = CliRunner().invoke(app, ["data", "pack", "shapes_train,shapes_video", "--registry", str(ds / "datasets.yaml"),
                                   "--model", str(tiny_model_dir), "--max-length", "600", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "fill ratio" in res.output
    packs = [json.loads(line) for line in out.read_text().splitlines()]
    reg = load_registry(ds / "datasets.yaml")
    originals = [json.dumps(r.raw, sort_keys=True) for r in load_mixture("shapes_train,shapes_video", reg)]
    packed = [json.dumps({k: v for k, v in s.items() if k != "data_path"}, sort_keys=True) for p in packs for s in p]
    assert sorted(packed) == sorted(originals)  # every sample exactly once
    # each pack fits, counted exactly; the packed file checks clean as a dataset of its own
    (ds / "datasets.yaml").write_text((ds / "datasets.yaml").read_text() + f"packed:\n  annotation_path: {out}\n")
    recs = load_mixture("packed", load_registry(ds / "datasets.yaml"))
    assert len(recs) == len(packs)
    report = check_records(recs, str(tiny_model_dir), max_length=600)
    assert report.ok
    by_pack: dict = {}
    for rec, r in zip(report.records, report.results):
        by_pack[rec.dataset] = by_pack.get(rec.dataset, 0) + r.length
    assert max(by_pack.values()) <= 600
    # too-long samples are reported, never cut; the input is never overwritten
    res = CliRunner().invoke(app, ["data", "pack", "shapes_train", "--registry", str(ds / "datasets.yaml"),
                                   "--model", str(tiny_model_dir), "--max-length", "120", "--out", str(tmp_path / "p2.jsonl")])
    assert res.exit_code == 0 and "longer than 120 tokens were left out" in res.output
    res = CliRunner().invoke(app, ["data", "pack", str(ds / "train.jsonl"), "--model", str(tiny_model_dir),
                                   "--max-length", "600", "--out", str(ds / "train.jsonl")])
    assert res.exit_code == 2 and "is the input file" in res.output
