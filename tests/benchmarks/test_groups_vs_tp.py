"""benchmarks/groups_vs_tp.py on resnet18 at 64x64: every cell is there, prunequant's shrunk == masked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning", reason="torch-pruning is not installed (pip install torch-pruning)")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "groups_vs_tp.py"


def load_script():
    spec = importlib.util.spec_from_file_location("groups_vs_tp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_groups_vs_tp_resnet18(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_script()
    monkeypatch.setattr(bench, "source_digest", lambda: "test")  # edits to src/ meanwhile do not count
    args = ["--models", "resnet18", "--size", "64", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "groups_vs_tp.json").read_text())
    assert report["size"] == 64 and report["ratio"] == 0.5
    assert set(report["versions"]) >= {"torch", "torchvision", "torch_pruning"} and report["cpu"]
    cells = report["models"]["resnet18"]
    assert set(cells) == {"dense", "tp", "pq", "pq_groups"}
    assert not any("error" in c for c in cells.values()), {k: c.get("error") for k, c in cells.items()}
    dense, tp = cells["dense"], cells["tp"]
    assert tp["runs"] and 0 < tp["macs"] < dense["macs"] and tp["pruned_groups"] > 0

    pq = cells["pq"]
    assert pq["allclose"] and pq["masked_equals_shrunk_counts"] and pq["output_scale"] > 1e-2  # not vacuous
    assert pq["sites"] > 0 and pq["group_sites"] == 0 and 0 < pq["macs"] < dense["macs"]
    assert pq["random_scored_sites"] == 0  # every site scored by its producers' weight L1
    grouped = cells["pq_groups"]
    if bench.has_groups():
        assert grouped["allclose"] and grouped["masked_equals_shrunk_counts"]
        assert grouped["group_sites"] > 0 and grouped["macs"] < pq["macs"]
        # resnet18: with groups, prunequant narrows exactly the layers Torch-Pruning does
        assert set(grouped["narrowed_layers"]) == set(tp["narrowed_layers"])
    else:
        assert "groups=" in grouped["not_run"]

    # Finished cells are cached and reused.
    cached = sorted(p.name for p in (tmp_path / "groups_vs_tp_cache").glob("*.json"))
    assert len(cached) == (4 if bench.has_groups() else 3)

    def fail(*a, **k):
        raise AssertionError("a cached cell was computed again")

    monkeypatch.setattr(bench, "RUNNERS", dict.fromkeys(bench.RUNNERS, fail))
    assert bench.main(args) == 0
    again = json.loads((tmp_path / "groups_vs_tp.json").read_text())["models"]["resnet18"]
    assert again["pq"] == pq and again["tp"] == tp
    md = (tmp_path / "groups_vs_tp.md").read_text()
    assert "Torch-Pruning" in md and "resnet18" in md and report["cpu"] in md
