"""``prunequant analyze``: the ranking analysis of a finished run, end to end, and its bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from clitools import fails as _fails

from prunequant.cli import main
from prunequant.models import build_model
from prunequant.report import SECTION_BEGIN, SECTION_END
from prunequant.runfolder import HOST, proc_start, verify_run

TINY = {
    "model": {"name": "resnet20", "width": 0.25},
    "data": {"name": "digits", "batch_size": 64, "train_subset": 256, "test_subset": 64},
    "train": {"dense_epochs": 1, "epochs": 2, "lr": 0.05, "compress_lr": 0.02, "progress": False,
              "threads": 1},
    # three sites (layer1's blocks) keep the run and the analysis short
    "recipe": {"prune": {"sparsity": 0.5, "unit": "steps", "start": 1, "interval": 1, "refresh": 1,
                         "exclude": ["layer2.*", "layer3.*"]},
               "quant": None},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("analyze")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["run", "--config", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


@pytest.fixture
def run_dir(finished_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_analyze_a_finished_run_and_bad_inputs(run_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """One test (the tiny run is made once per xdist worker): the analysis, then every bad input."""
    before = _snapshot(run_dir)
    run_summary = (run_dir / "summary.md").read_text()
    args = ["analyze", str(run_dir), "--calib", "100", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ranking depends" in out
    a = run_dir / "analysis"
    rep = json.loads((a / "ranking.json").read_text())
    assert (a / "ranking_tau.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run's own files are untouched; the analysis files are listed and the folder still verifies
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in before and k not in ("summary.md", "manifest.json")} == \
        {k: v for k, v in before.items() if k not in ("summary.md", "manifest.json")}
    files = verify_run(run_dir, required=("report.json", "analysis/ranking.json", "analysis/ranking_tau.png"))
    assert "dense.pt" in files
    assert rep["source"]["dense"] == str(run_dir / "dense.pt")
    assert rep["data"]["name"] == "digits" and rep["data"]["calibration_images"] == 100
    assert rep["measures"] == ["a_l1", "a_l0", "w_l1"] and rep["sparsities"] == [0.25, 0.5, 0.75]
    sites = {s["name"]: s for s in rep["sites"]}
    assert list(sites) == ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"]
    assert sites["layer1.0.conv1"]["predecessor"] is None
    assert sites["layer1.0.conv1"]["measures"]["a_l1"]["preceding"] is None
    assert sites["layer1.1.conv1"]["predecessor"] == "layer1.0.conv1"
    assert sites["layer1.2.conv1"]["predecessor"] == "layer1.1.conv1"
    assert all(s["predecessor_via"] == "graph" for s in rep["sites"][1:])
    for s in rep["sites"][1:]:
        for m in ("a_l1", "a_l0", "w_l1"):
            for got in s["measures"][m]["preceding"].values():
                assert -1.0 <= got["tau"] <= 1.0 and 0 <= got["kept_overlap"] <= 1
                assert sorted(got["ranking"]) == list(range(s["channels"]))
                if m == "w_l1":
                    assert got["tau"] == 1.0 and got["edit_distance"] == 0
    summary = (run_dir / "summary.md").read_text()
    assert summary.startswith(run_summary.rstrip("\n") + "\n\n" + SECTION_BEGIN)  # appended, nothing lost
    assert summary.count(SECTION_BEGIN) == 1 and summary.rstrip().endswith(SECTION_END)
    assert "| A-L1 | 25 % |" in summary and "| W-L1 | 75 % | 1.000 | 1.000 | 0.0 | 0.00 | 1.00 |" in summary
    assert "![Kendall tau per layer and preceding sparsity](analysis/ranking_tau.png)" in summary
    # a second analysis replaces the section instead of appending another one
    assert main(args[:-1] + ["--measures", "w_l1", "--sparsities", "0.5", "--no-progress"]) == 0
    summary = (run_dir / "summary.md").read_text()
    assert summary.count(SECTION_BEGIN) == 1 and "| A-L1 |" not in summary and "| W-L1 | 50 % |" in summary
    assert summary.startswith(run_summary.rstrip("\n") + "\n\n" + SECTION_BEGIN)
    verify_run(run_dir)
    check_bad_inputs(run_dir, tmp_path, capsys)


def test_analyze_from_a_config(tmp_path: Path) -> None:
    """--config with train.dense_checkpoint (here an untrained network saved by hand: no manifest)."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8, width=0.25)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"],
                                                     "dense_checkpoint": str(tmp_path / "dense.pt")}}))
    out = tmp_path / "an"
    assert main(["analyze", "--config", str(cfg), "--out", str(out), "--calib", "64",
                 "--measures", "a_l1", "--sparsities", "0.5", "--mode", "eval", "--no-progress"]) == 0
    rep = json.loads((out / "ranking.json").read_text())
    assert rep["mode"] == "eval" and rep["source"]["config"] == str(cfg)
    assert rep["source"]["run_dir"] is None and len(rep["sites"]) == 3
    assert list(rep["summary"]) == ["a_l1"] and list(rep["summary"]["a_l1"]) == ["0.5"]
    assert SECTION_BEGIN in (out / "summary.md").read_text()
    assert (out / "ranking_tau.png").is_file() and not (out / "manifest.json").exists()


def check_bad_inputs(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every bad input: exit code 2, one message, no traceback, no file changed or written."""
    before = _snapshot(run_dir)
    _fails(["analyze", str(tmp_path / "nowhere")], capsys, "no such folder")
    _fails(["analyze", str(run_dir), "--measures", "a_l2"], capsys, "did you mean 'a_l1'")
    _fails(["analyze", str(run_dir), "--sparsities", "0.5", "1.5"], capsys, "--sparsities", "outside (0, 1)")
    _fails(["analyze", str(run_dir), "--sparsities", "0"], capsys, "outside (0, 1)")
    _fails(["analyze", str(run_dir), "--calib", "0"], capsys, "--calib")
    _fails(["analyze"], capsys, "give a run folder")
    _fails(["analyze", str(run_dir), "--set", "model.width=1"], capsys, "--set")
    _fails(["analyze", str(run_dir), "--out", str(run_dir / "report.json")], capsys, "is an existing file")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    _fails(["analyze", "--config", str(cfg), "--out", str(tmp_path / "o")], capsys,
           "train.dense_checkpoint is not set")
    assert _snapshot(run_dir) == before and not (tmp_path / "o").exists()
    # a live process holds the run folder (e.g. a run resuming into it): refused, its lock left alone
    lock = run_dir / "run.lock"
    holder = {"pid": os.getpid(), "host": HOST, "started": proc_start(os.getpid()), "time": time.time()}
    lock.write_text(json.dumps(holder))
    _fails(["analyze", str(run_dir)], capsys, "another prunequant process is writing this folder")
    assert json.loads(lock.read_text()) == holder
    lock.unlink()
    assert _snapshot(run_dir) == before
    # a tampered file: the manifest no longer matches, nothing is read or written
    dense = run_dir / "dense.pt"
    data = bytearray(dense.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dense.write_bytes(bytes(data))
    before = _snapshot(run_dir)
    _fails(["analyze", str(run_dir)], capsys, "dense.pt", "SHA-256")
    man = run_dir / "manifest.json"
    man.write_text(man.read_text()[:40])
    _fails(["analyze", str(run_dir)], capsys, "manifest.json", "not valid JSON")
    os.remove(man)
    _fails(["analyze", str(run_dir)], capsys, "no manifest.json")
    before.pop("manifest.json")
    assert _snapshot(run_dir) == before
