"""benchmarks/grid.py: the quick grid end to end (cells, dense sharing, locks, resuming, tables, plots),
the cell.json schema that peers.py writes against, and the lock protocol."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from prunequant.runfolder import verify_run

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "grid.py"


def load_script():
    """benchmarks/grid.py as the module ``grid`` (the name peers.py imports it by)."""
    mod = sys.modules.get("grid")
    if mod is not None and Path(getattr(mod, "__file__", "")).resolve() == SCRIPT:
        return mod
    spec = importlib.util.spec_from_file_location("grid", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["grid"] = mod  # registered first: dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    return mod


grid = load_script()
# scikit-learn's 8x8 digits (always there, ~10x cheaper per step than 28x28): the --set reaches every cell.
QUICK = ["--quick", "--no-progress", "--poll", "0.2", "--set", "data.name=digits"]


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])


def _peer(seed: int, acc: float, mem: float, **kw) -> dict:
    rec = {"id": f"peer_demo_s{seed}", "family": "peer", "label": "demo peer (ternary)", "seed": seed,
           "importance": None, "schedule": None, "sparsity": None, "bits": "W2A8", "accuracy": acc,
           "dense_accuracy": 90.0, "memory_mbit": mem, "weight_mbit": mem / 2, "act_mbit": mem / 2,
           "macs": 1000, "bops": 16000, "params": 50, "density": acc / mem,
           "levels": {"weights": 3, "acts": 256}, "note": "test record written by the test"}
    rec.update(kw)
    return rec


def test_quick_grid_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g"
    expected = {c.id for c in grid.subgrid("quick", 0)}
    assert expected == {"dense_s0", "width_x0.25_W4A4_s0", "pq_a_l1_layerwise_75_W4A4_s0",
                        "pq_w_l1_oneshot_50_W8A8_s0", "pq_random_stepwise_50_FP32_s0"}
    ran: list[str] = []
    real = grid.run_cell

    def counting(cfg, folder, log):
        ran.append(folder.name)
        return real(cfg, folder, log)

    monkeypatch.setattr(grid, "run_cell", counting)

    # 1. A live process holds the dense cell: the thin network (from scratch) runs meanwhile, the cells
    # that fine-tune the dense network wait and give up after --max-wait; the live lock is left alone.
    lock = grid.lock_path(out, "dense_s0")
    lock.parent.mkdir(parents=True)
    sleeper = _sleeper()
    try:
        holder = {"pid": sleeper.pid, "host": grid.HOST, "started": grid._start_time(sleeper.pid)}
        lock.write_text(json.dumps(holder))
        assert grid.main([*QUICK, "--out", str(out), "--max-wait", "1"]) == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ran == ["width_x0.25_W4A4_s0"]
    assert json.loads(lock.read_text()) == holder
    assert not (out / "dense_s0").exists() and not list(out.glob("pq_*"))
    assert "gave up waiting for dense_s0" in capsys.readouterr().out

    # 2. Its process is gone: the stale lock is taken over and the rest runs; the finished cell is skipped.
    ran.clear()
    assert grid.main([*QUICK, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "took over a stale lock" in printed and "finished earlier, skipped" in printed
    assert ran[0] == "dense_s0" and sorted(ran) == sorted(expected - {"width_x0.25_W4A4_s0"})
    assert not list((out / "locks").iterdir())  # every lock released

    cells = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/cell.json")}
    assert set(cells) == expected
    reports = {}
    for cid, c in cells.items():
        assert list(c) == list(grid.CELL_FIELDS) and grid.validate_cell(c) is c
        verify_run(out / cid, required=("report.json",))
        assert grid.cell_done(out / cid)
        rep = reports[cid] = json.loads((out / cid / "report.json").read_text())
        fin = rep["phases"]["final"]
        assert c["accuracy"] == fin["accuracy"] and c["memory_mbit"] == fin["memory_mbit"]
        assert (c["macs"], c["bops"], c["params"]) == (fin["macs"], fin["bops"], fin["params"])
        assert c["dense_accuracy"] == rep["phases"]["dense"]["accuracy"]
        assert math.isclose(c["density"], c["accuracy"] / c["memory_mbit"])
        assert grid.QUICK_NOTE in c["note"] and c["levels"] is None
        assert rep["data"]["name"] == "digits" and rep["data"]["train"] == 128 and rep["data"]["test"] == 100
    assert {c["family"] for c in cells.values()} == {"prunequant", "width"}

    # One dense network per seed: trained once in dense_s0, loaded by every compressed cell.
    dense = reports["dense_s0"]
    assert dense["steps"]["dense"] > 0 and dense["config"]["recipe"]["prune"] is None
    assert dense["config"]["recipe"]["quant"] is None and cells["dense_s0"]["bits"] == "FP32"
    for cid in expected:
        if cid.startswith("pq_"):
            cfg = reports[cid]["config"]
            assert cfg["train"]["dense_checkpoint"] == str(grid.dense_path(out, 0).resolve())
            assert reports[cid]["steps"] == {"dense": 0, "compress": dense["steps"]["compress"]}
            assert cells[cid]["dense_accuracy"] == cells["dense_s0"]["dense_accuracy"]
    thin = reports["width_x0.25_W4A4_s0"]
    assert thin["config"]["model"]["width"] == 0.25 and thin["config"]["train"]["dense_checkpoint"] is None
    assert thin["steps"] == dense["steps"]  # the same budget, from scratch
    tq = thin["config"]["recipe"]["quant"]
    assert (tq["weight_bits"], tq["act_bits"]) == (4, 4)
    # The axes reach the runs: importance / schedule / sparsity / bits.
    p75 = reports["pq_a_l1_layerwise_75_W4A4_s0"]["config"]["recipe"]
    assert (p75["prune"]["importance"], p75["prune"]["schedule"], p75["prune"]["sparsity"]) \
        == ("a_l1", "layerwise", 0.75)
    w8 = reports["pq_w_l1_oneshot_50_W8A8_s0"]["config"]["recipe"]
    assert (w8["prune"]["importance"], w8["prune"]["schedule"]) == ("w_l1", "oneshot")
    assert (w8["quant"]["weight_bits"], w8["quant"]["act_bits"]) == (8, 8)
    fp = reports["pq_random_stepwise_50_FP32_s0"]
    assert fp["config"]["recipe"]["quant"] is None
    assert fp["config"]["recipe"]["prune"]["schedule"] == "stepwise"
    for layer in fp["layers"]:
        before = layer["channels_before"]
        assert layer["channels_after"] == before - math.floor(0.5 * before)
    mem = {k: c["memory_mbit"] for k, c in cells.items()}
    assert mem["pq_a_l1_layerwise_75_W4A4_s0"] < mem["pq_w_l1_oneshot_50_W8A8_s0"] \
        < mem["pq_random_stepwise_50_FP32_s0"] < mem["dense_s0"]
    assert cells["pq_a_l1_layerwise_75_W4A4_s0"]["macs"] < cells["pq_w_l1_oneshot_50_W8A8_s0"]["macs"] \
        < cells["dense_s0"]["macs"]

    # 3. Tables and plots, from every cell.json (also one a peer script wrote).
    summary = json.loads((out / "grid.json").read_text())
    assert {c["id"] for c in summary["cells"]} == expected
    for cid, c in cells.items():
        g = summary["groups"][grid.group_of(cid)]
        assert g["n"] == 1 and g["seeds"] == [0] and g["accuracy"]["std"] is None
        for f in grid.NUMERIC:
            assert g[f]["mean"] == c[f] and g[f]["values"] == [c[f]]
    assert summary["pareto"]["memory"] and set(summary["pareto"]["memory"]) <= set(summary["groups"])
    md = (out / "grid.md").read_text()
    assert "CPU class: " in md and "--quick" in md and "grid.py --quick" in md
    for c in cells.values():
        assert f"| {c['label']} |" in md
    for name in ("pareto_memory.png", "pareto_bops.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # 4. Resuming: everything is finished, nothing runs; a lost cell.json comes back from report.json.
    ran.clear()
    before = (out / "pq_a_l1_layerwise_75_W4A4_s0" / "cell.json").read_text()
    (out / "pq_a_l1_layerwise_75_W4A4_s0" / "cell.json").unlink()
    assert grid.main([*QUICK, "--out", str(out)]) == 0
    assert ran == [] and "ran 0, finished earlier 5" in capsys.readouterr().out
    assert (out / "pq_a_l1_layerwise_75_W4A4_s0" / "cell.json").read_text() == before

    # An edited report is not a finished cell (it would run again).
    rep = out / "pq_w_l1_oneshot_50_W8A8_s0" / "report.json"
    rep.write_text(rep.read_text().replace('"accuracy"', '"accuracy" ', 1))
    assert not grid.cell_done(rep.parent)

    # --table-only collects cells it did not write (a peer's, two seeds) and leaves out invalid ones.
    grid.write_cell(out / "peer_demo_s0", _peer(0, 80.0, 0.5))
    grid.write_cell(out / "peer_demo_s1", _peer(1, 84.0, 0.5))
    (out / "peer_bad_s0").mkdir()
    bad = _peer(0, 80.0, 0.5, id="peer_bad_s0", density=1.0)
    (out / "peer_bad_s0" / "cell.json").write_text(json.dumps(bad))
    assert grid.main(["--table-only", "--out", str(out)]) == 0
    summary = json.loads((out / "grid.json").read_text())
    peer = summary["groups"]["peer_demo"]
    assert peer["n"] == 2 and peer["accuracy"]["mean"] == 82.0
    assert peer["accuracy"]["std"] == pytest.approx(statistics.stdev([80.0, 84.0]))
    assert peer["levels"] == {"weights": 3, "acts": 256} and summary["subgrids"]["peers"] == ["peer_demo"]
    assert len(summary["invalid"]) == 1 and "peer_bad_s0" in summary["invalid"][0]
    md = (out / "grid.md").read_text()
    assert "test record written by the test" in md and "82.00 ± 2.83" in md and "levels W3/A256" in md


def test_cell_schema() -> None:
    good = _peer(0, 80.0, 0.5)
    assert grid.validate_cell(dict(good)) == good
    bad = [
        ({k: v for k, v in good.items() if k != "note"}, "missing fields: note"),
        ({**good, "extra": 1}, "unknown fields: extra"),
        ({**good, "family": "other"}, "family"),
        ({**good, "density": 1.0}, "density"),
        ({**good, "id": "peer_demo"}, "must end in _s0"),
        ({**good, "accuracy": 120.0, "density": 240.0}, "accuracy"),
        ({**good, "levels": {"weights": 3}}, "levels"),
        ({**good, "levels": {"weights": 3, "acts": -1}}, "levels"),
        ({**good, "memory_mbit": 0.0, "density": 0.0}, "memory_mbit"),
        ({**good, "seed": True}, "seed"),
    ]
    for rec, why in bad:
        with pytest.raises(ValueError, match=why):
            grid.validate_cell(rec)


def test_write_cell(tmp_path: Path) -> None:
    path = grid.write_cell(tmp_path / "peer_demo_s0", _peer(0, 80.0, 0.5))
    assert json.loads(path.read_text()) == _peer(0, 80.0, 0.5)
    with pytest.raises(ValueError, match="folder's name"):
        grid.write_cell(tmp_path / "elsewhere", _peer(0, 80.0, 0.5))
    with pytest.raises(ValueError, match="density"):
        grid.write_cell(tmp_path / "peer_demo_s0", _peer(0, 80.0, 0.5, density=3.0))
    assert json.loads(path.read_text()) == _peer(0, 80.0, 0.5)  # a rejected record leaves the file alone
    assert grid.dense_path(tmp_path, 3) == tmp_path / "dense_s3" / "dense.pt"


def test_peer_tables_per_sparsity(tmp_path: Path) -> None:
    """peers.py's cells (``peer_<name>_<sparsity %>_s<seed>``): one group per sparsity, one grid.md table per
    sparsity beside prunequant's layerwise A-L1 of that sparsity and bits; unpruned peers apart."""
    def rec(cid: str, seed: int, sp: float | None, acc: float, family: str = "peer", **kw) -> dict:
        return _peer(seed, acc, 0.5, id=f"{cid}_s{seed}", family=family, sparsity=sp, bits="W4A4",
                     label=f"{cid} label", **kw)

    pq = {"importance": "a_l1", "schedule": "layerwise", "levels": None}
    cells = [rec("pq_a_l1_layerwise_75_W4A4", 0, 0.75, 70.0, "prunequant", **pq),
             rec("pq_a_l1_layerwise_50_W4A4", 0, 0.5, 75.0, "prunequant", **pq),
             rec("width_x1_W4A4", 0, None, 85.0, "width", levels=None)]
    cells += [rec(f"peer_{n}_{pct}", s, pct / 100, 60.0 + s) for n in ("qsparse", "tp_pq") for pct in (50, 75)
              for s in (0, 1)]
    cells += [rec("peer_brevitas_dense", s, None, 80.0) for s in (0, 1)]
    for c in cells:
        grid.write_cell(tmp_path / c["id"], c)
    groups = grid.summarize(grid.collect(tmp_path)[0])
    assert groups["peer_qsparse_75"]["n"] == 2 and groups["peer_qsparse_75"]["sparsity"] == 0.75
    assert groups["peer_qsparse_50"]["accuracy"]["mean"] == 60.5
    assert grid.peer_sections(groups) == [
        ("Peers at 75 % channel sparsity, beside prunequant's layerwise A-L1 at 75 % and their bits",
         ["pq_a_l1_layerwise_75_W4A4"], ["peer_qsparse_75", "peer_tp_pq_75"]),
        ("Peers at 50 % channel sparsity, beside prunequant's layerwise A-L1 at 50 % and their bits",
         ["pq_a_l1_layerwise_50_W4A4"], ["peer_qsparse_50", "peer_tp_pq_50"]),
        ("Peers without pruning, beside the full-width network at their bits", ["width_x1_W4A4"],
         ["peer_brevitas_dense"]),
    ]
    res = grid.table(tmp_path, plots=False)
    assert res["subgrids"]["peers"] == ["peer_qsparse_75", "peer_tp_pq_75", "peer_qsparse_50",
                                        "peer_tp_pq_50", "peer_brevitas_dense"]
    md = (tmp_path / "grid.md").read_text()
    sec = md.split("\n## ")
    at75 = next(t for t in sec if t.startswith("Peers at 75 %"))
    at50 = next(t for t in sec if t.startswith("Peers at 50 %"))
    assert "| peer_qsparse_75 label (levels" in at75 and "| pq_a_l1_layerwise_75_W4A4 label |" in at75
    assert "_50" not in at75 and "| peer_tp_pq_50 label (levels" in at50 and "_75" not in at50
    assert md.index("## Peers at 75 %") < md.index("## Peers at 50 %") < md.index("## Peers without pruning")


def test_locks(tmp_path: Path) -> None:
    cid = "pq_a_l1_layerwise_75_W4A4_s0"
    path = grid.lock_path(tmp_path, cid)
    assert grid.claim(tmp_path, cid)
    assert json.loads(path.read_text())["pid"] == grid.os.getpid()
    assert not grid.claim(tmp_path, cid)  # held by a live process (this one)
    grid.release(tmp_path, cid)
    assert not path.exists()

    # A lock of a process that is gone is taken over; one of a live process or another host is not.
    sleeper = _sleeper()
    live = {"pid": sleeper.pid, "host": grid.HOST, "started": grid._start_time(sleeper.pid)}
    try:
        path.write_text(json.dumps(live))
        assert not grid.claim(tmp_path, cid) and json.loads(path.read_text()) == live
        # the same pid with another start time is another process (the pid was reused): stale
        path.write_text(json.dumps({**live, "started": "1"}))
        assert grid.claim(tmp_path, cid)
        grid.release(tmp_path, cid)
    finally:
        sleeper.kill()
        sleeper.wait()
    path.write_text(json.dumps(live))  # its process is gone now
    assert grid.lock_stale(live)
    assert grid.claim(tmp_path, cid) and json.loads(path.read_text())["pid"] == grid.os.getpid()
    assert not list(path.parent.glob("*.stale.*"))
    grid.release(tmp_path, cid)
    path.write_text(json.dumps({"pid": 1, "host": "another-host", "started": None}))
    assert not grid.claim(tmp_path, cid)
    grid.release(tmp_path, cid)  # not ours: left in place
    assert path.exists()


def test_select_and_pareto() -> None:
    cells = grid.select_cells(["method", "bits", "width"], [0, 1])
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids)) == 2 * (12 + 7 + 6)  # method and bits share A-L1 layerwise 75 % W4A4
    assert ids[:2] == ["dense_s0", "dense_s1"]  # dense networks first, then cells from scratch
    assert all(not c.needs_dense for c in cells[2:10]) and all(c.needs_dense for c in cells[10:])
    assert len(grid.select_cells(["all"], [0])) == 4 * 3 * 2 * 4 + 6
    only = grid.select_cells(["method"], [0], only=["pq_random_*"])
    assert [c.id for c in only] == ["dense_s0"] + [f"pq_random_{s}_75_W4A4_s0" for s in grid.SCHEDULES]
    points = {"a": (1.0, 50.0), "b": (2.0, 40.0), "c": (3.0, 60.0), "d": (1.0, 45.0)}
    assert grid.pareto_front(points) == ["a", "c"]


def test_failures_do_not_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prunequant.recipe import RecipeError
    from prunequant.runfolder import RunFolder

    base = {"model": {"name": "resnet20", "width": 1.0}}
    calls: list[str] = []

    def broken(cfg, folder, log):
        calls.append(folder.name)
        raise RuntimeError("boom")

    # A dense cell that fails: its dependents are not run (and not waited for), every lock is released.
    monkeypatch.setattr(grid, "run_cell", broken)
    cells = grid.select_cells(["quick"], [0], only=["pq_a_l1_*"])
    res = grid.run_grid(cells, base, tmp_path, poll=0.01, max_wait=5, log=lambda m: None)
    assert calls == ["dense_s0"]
    assert res["failed"] == ["dense_s0", "pq_a_l1_layerwise_75_W4A4_s0"] and not res["waiting"]
    assert not list((tmp_path / "locks").iterdir())

    # The dense network not readable for a moment (its manifest being rewritten): tried once more.
    calls.clear()
    RunFolder(tmp_path / "dense_s0").save_tensors("dense.pt", {})
    assert grid.dense_ready(tmp_path, 0)

    def unreadable(cfg, folder, log):
        calls.append(folder.name)
        raise RecipeError(f"train.dense_checkpoint: {cfg.train.dense_checkpoint} is not listed")

    monkeypatch.setattr(grid, "run_cell", unreadable)
    pq = [c for c in cells if not c.is_dense]
    res = grid.run_grid(pq, base, tmp_path, poll=0.01, max_wait=5, log=lambda m: None)
    assert calls == ["pq_a_l1_layerwise_75_W4A4_s0"] * 2 and res["failed"] == [pq[0].id]


def test_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g"
    assert grid.main([*QUICK, "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for c in grid.subgrid("quick", 0):
        assert f"{c.id}: to run;" in printed
    assert "5 cells, 8 steps per epoch, 0 refused" in printed and not out.exists()  # nothing written
    # A compression budget shorter than the schedule is refused before anything trains.
    short = ["--set", "train.epochs=1", "--only", "pq_a_l1_*"]
    assert grid.main([*QUICK, "--out", str(out), "--dry-run", *short]) == 1
    printed = capsys.readouterr().out
    assert "pq_a_l1_layerwise_75_W4A4_s0: to run; REFUSED: train.epochs" in printed
    assert "dense_s0: to run; resnet20 x1 FP32 (dense)" in printed  # nothing to schedule: fits
