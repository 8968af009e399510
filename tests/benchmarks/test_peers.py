"""benchmarks/peers.py --quick: qsparse, Torch-Pruning + prunequant QAT, Brevitas (dense / shrunk) cells."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"


def load_script():
    name = "peers_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_levels_on_hand_made_tensors() -> None:
    peers = load_script()
    t = torch.linspace(-1.0, 1.0, 16).repeat(3, 5)  # exactly 16 distinct values
    assert t.unique().numel() == 16
    probe = nn.Sequential(nn.Identity(), nn.Identity())
    rows = peers.act_levels(probe, t, {"0": (probe[0], 4), "1": (probe[1], 4)})
    assert rows == [{"name": "0", "bits": 4, "levels": 16}, {"name": "1", "bits": 4, "levels": 16}]
    rows[1]["levels"] = 17
    weights = [{"name": "a", "bits": 4, "levels": 15}, {"name": "fc", "bits": 8, "levels": 200}]
    s = peers.summarize_levels(weights, rows, 4, 4)
    assert s["levels"] == {"weights": 15, "acts": 17}
    assert s["levels_other"] == {"weights_8bit": 200}
    assert peers._level_note(s["levels"], 4, 4) == "activations use 17 levels (> 16: not 4-bit)"
    assert peers._level_note({"weights": 16, "acts": 16}, 4, 4) == ""
    # weight codes: -8..7 is 4-bit (16 levels); an unsaturated +8 makes 17 and leaves the range
    ok = peers.weight_row("conv", 4, torch.arange(-8.0, 8.0).repeat(4))
    assert ok == {"name": "conv", "bits": 4, "levels": 16, "min_code": -8, "max_code": 7}
    bad = peers.weight_row("conv2", 4, torch.arange(-8.0, 9.0))
    assert bad["levels"] == 17
    s = peers.summarize_levels([ok, bad], rows, 4, 4)
    assert s["levels"]["weights"] == 17 and s["codes_outside_range"] == ["conv2 (4-bit): -8..8"]


def test_quick_run_writes_every_peer_cell_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    peers = load_script()
    args = ["--quick", "--out", str(tmp_path), "--threads", "1"]
    assert peers.main(args) == 0
    dense_dir = tmp_path / "dense_s0"
    assert (dense_dir / "dense.pt").is_file() and (dense_dir / "manifest.json").is_file()

    cells, extra = {}, {}
    for name in peers.PEERS:
        folder = tmp_path / f"peer_{name}_s0"
        cell = json.loads((folder / "cell.json").read_text())
        assert list(cell) == list(peers.CELL_FIELDS)
        peers.grid.validate_cell(cell)  # benchmarks/grid.py's own check of the schema
        assert cell["id"] == folder.name and cell["family"] == "peer" and cell["seed"] == 0
        assert cell["bits"] == "W4A4" and cell["label"] and cell["note"]
        assert 0.0 <= cell["accuracy"] <= 100.0 and 0.0 <= cell["dense_accuracy"] <= 100.0
        assert cell["memory_mbit"] == pytest.approx(cell["weight_mbit"] + cell["act_mbit"])
        assert math.isclose(cell["density"], cell["accuracy"] / cell["memory_mbit"], rel_tol=1e-9)
        assert cell["macs"] > 0 and cell["params"] > 0
        assert cell["bops"] >= cell["macs"] * 16  # every layer at >= 4 x 4 bits
        lv = cell["levels"]
        assert set(lv) == {"weights", "acts"} and all(isinstance(v, int) and v >= 2 for v in lv.values())
        # a cell using more levels than its bits allow says so
        assert ("not 4-bit" in cell["note"]) == (max(lv.values()) > 16)
        cells[name] = cell
        extra[name] = json.loads((folder / "peer.json").read_text())
        assert (folder / "model.pt").stat().st_size == extra[name]["physical_bytes"]
    assert len({c["dense_accuracy"] for c in cells.values()}) == 1  # one dense network for all

    # Levels: prunequant saturates to 16 codes, Brevitas' narrow-range weights use at most 15.
    assert cells["tp_pq"]["levels"]["weights"] <= 16 and cells["tp_pq"]["levels"]["acts"] <= 16
    for b in ("brevitas_dense", "brevitas_tp"):
        assert cells[b]["levels"]["weights"] <= 15 and cells[b]["levels"]["acts"] <= 16
    assert cells["qsparse"]["levels"]["acts"] <= 16  # its activation quantizer clamps to 2^b codes
    for name in ("tp_pq", "brevitas_dense", "brevitas_tp"):  # these saturate to the b-bit range
        levels = json.loads((tmp_path / f"peer_{name}_s0" / "levels.json").read_text())
        assert levels["codes_outside_range"] == [] and levels["weight_layers"]

    # Torch-Pruning really shrinks: fewer channels (residual stream included), params, MACs.
    for name in ("tp_pq", "brevitas_tp"):
        ch = extra[name]["channels"]
        assert extra[name]["shrunk"] is True
        assert ch["after"]["conv1"] == ch["dense"]["conv1"] // 2  # the stem feeds the residual adds
        assert ch["after"]["layer3.2.conv1"] == ch["dense"]["layer3.2.conv1"] // 2
        assert ch["after"]["fc"] == ch["dense"]["fc"]  # the classifier is left alone
    dense = cells["brevitas_dense"]
    for name in ("tp_pq", "brevitas_tp"):
        assert cells[name]["params"] < 0.4 * dense["params"] and cells[name]["macs"] < 0.4 * dense["macs"]
    # the same shrunk network at the same bits: the same cost whichever tool quantizes it
    for k in ("memory_mbit", "macs", "bops"):
        assert cells["tp_pq"][k] == pytest.approx(cells["brevitas_tp"][k])
    assert extra["brevitas_tp"]["physical_bytes"] < 0.5 * extra["brevitas_dense"]["physical_bytes"]
    # qsparse masks (not shrunk) half of every block-internal channel set
    q = extra["qsparse"]
    assert q["shrunk"] is False and "not shrunk" in cells["qsparse"]["note"]
    assert len(q["kept_channels"]) == 9 and all(k == n // 2 for k, n in q["kept_channels"].values())
    assert tp_memory_order(cells)
    # grid.py's table collects the peer cells with its own
    collected, problems = peers.grid.collect(tmp_path)
    assert not problems and {c["id"] for c in collected} == {f"peer_{n}_s0" for n in peers.PEERS}

    # Resuming: finished cells are skipped, nothing is computed again.
    stamps = {n: (tmp_path / f"peer_{n}_s0" / "cell.json").stat().st_mtime_ns for n in peers.PEERS}

    def fail(*a, **k):
        raise AssertionError("a finished cell was computed again")

    monkeypatch.setattr(peers, "RUNNERS", dict.fromkeys(peers.RUNNERS, fail))
    monkeypatch.setattr(peers, "train_dense", fail)
    assert peers.main(args) == 0
    assert stamps == {n: (tmp_path / f"peer_{n}_s0" / "cell.json").stat().st_mtime_ns for n in peers.PEERS}

    # An unfinished cell another process holds (grid.py's lock) is left to it.
    (tmp_path / "peer_tp_pq_s0" / "cell.json").unlink()
    assert peers.grid.claim(tmp_path, "peer_tp_pq_s0")
    try:
        assert peers.main(args) == 0
    finally:
        peers.grid.release(tmp_path, "peer_tp_pq_s0")
    assert not (tmp_path / "peer_tp_pq_s0" / "cell.json").exists()
    assert "claimed by another process, left to it" in capsys.readouterr().out


def tp_memory_order(cells: dict) -> bool:
    """Pruning and quantizing cost less memory than quantizing alone."""
    dense = cells["brevitas_dense"]["memory_mbit"]
    return all(cells[n]["memory_mbit"] < dense for n in ("qsparse", "tp_pq", "brevitas_tp"))
