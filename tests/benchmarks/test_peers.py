"""benchmarks/peers.py --quick: qsparse, Torch-Pruning + prunequant QAT, Brevitas (dense / shrunk) cells at
both of grid.py's sparsities, named as grid.py names its cells, configured through grid.py's --config /
--set."""

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


def test_cells_names_and_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    peers = load_script()
    # Pruning peers are named by the sparsity percent (grid.py's naming); brevitas_dense once per seed.
    ids = [c.id for c in peers.peer_cells(list(peers.PEERS), [0.5, 0.75], 3)]
    assert ids == ["peer_qsparse_50_s3", "peer_tp_pq_50_s3", "peer_brevitas_dense_s3",
                   "peer_brevitas_tp_50_s3", "peer_qsparse_75_s3", "peer_tp_pq_75_s3",
                   "peer_brevitas_tp_75_s3"]
    assert [c.id for c in peers.peer_cells(["brevitas_dense"], [0.75], 0)] == ["peer_brevitas_dense_s0"]
    assert peers.PeerCell("qsparse", 0, 0.75).id == "peer_qsparse_75_s0"
    assert {peers.grid.group_of(i) for i in ids} == {i[:-3] for i in ids}  # grid.py's groups: id less _s3

    # Defaults as grid.py's: seeds 0 1 2, sparsities 0.5 0.75, its recipe and folder (--quick: seed 0).
    a = peers.parse_args([])
    assert a.seeds == [0, 1, 2] and a.sparsities == [0.5, 0.75] and a.out == peers.grid.OUT
    assert a.config == str(peers.grid.RECIPE) and a.set == []
    a = peers.parse_args(["--quick", "--sparsities", "0.75", "0.75", "--set", "data.name=digits"])
    assert a.seeds == [0] and a.sparsities == [0.75] and a.out == peers.grid.OUT_QUICK

    # --config / --set go through grid.py's base_config: the same configuration as grid.py's cells.
    sets = ["data.name=digits", "model.width=0.5"]
    base = peers.grid.base_config(a.config, sets, quick=True, threads=1)
    cfg = peers.make_config(base, 2, 0.75)
    assert cfg.data.name == "digits" and cfg.model.width == 0.5 and cfg.data.train_subset == 128
    assert cfg.recipe.prune.sparsity == 0.75 and cfg.train.seed == 2 and cfg.train.threads == 1
    assert peers.make_config(base, 2).recipe.prune.sparsity == 0.5  # the recipe's, for brevitas_dense
    pq = peers.grid.cell_config(base, peers.grid._pq(2, "a_l1", "layerwise", 0.75, "W4A4"), Path("/x"))
    assert cfg.data == pq.data and cfg.model == pq.model and cfg.recipe.prune == pq.recipe.prune

    # A bad --sparsities: exit status 2 and one message.
    for bad in (["1.5"], ["0"], ["0.5", "abc"], ["0.751", "0.752"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            peers.parse_args(["--sparsities", *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "argument --sparsities" in err, err


def test_quick_run_writes_every_peer_cell_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    peers = load_script()
    # grid.py's --quick sizes on scikit-learn's 8x8 digits (the --set reaches every cell), both sparsities.
    args = ["--quick", "--out", str(tmp_path), "--threads", "1", "--set", "data.name=digits"]
    assert peers.main(args) == 0
    dense_dir = tmp_path / "dense_s0"
    assert (dense_dir / "dense.pt").is_file() and (dense_dir / "manifest.json").is_file()
    ids = {f"peer_{n}_{pct}_s0": (n, pct) for n in peers.PEERS if n not in peers.UNPRUNED for pct in (50, 75)}
    ids["peer_brevitas_dense_s0"] = ("brevitas_dense", None)
    assert {p.name for p in tmp_path.glob("peer_*")} == set(ids)

    cells, extra = {}, {}
    for cid, (name, pct) in ids.items():
        folder = tmp_path / cid
        cell = json.loads((folder / "cell.json").read_text())
        assert list(cell) == list(peers.CELL_FIELDS)
        peers.grid.validate_cell(cell)  # benchmarks/grid.py's own check of the schema
        assert cell["id"] == cid and cell["family"] == "peer" and cell["seed"] == 0
        assert cell["sparsity"] == (None if pct is None else pct / 100)
        assert cell["bits"] == "W4A4" and cell["note"] and peers.grid.QUICK_NOTE in cell["note"]
        assert cell["label"] == peers.LABELS[name] + (", W4A4" if pct is None else f", {pct} % W4A4")
        assert 0.0 <= cell["accuracy"] <= 100.0 and 0.0 <= cell["dense_accuracy"] <= 100.0
        assert cell["memory_mbit"] == pytest.approx(cell["weight_mbit"] + cell["act_mbit"])
        assert math.isclose(cell["density"], cell["accuracy"] / cell["memory_mbit"], rel_tol=1e-9)
        assert cell["macs"] > 0 and cell["params"] > 0
        assert cell["bops"] >= cell["macs"] * 16  # every layer at >= 4 x 4 bits
        lv = cell["levels"]
        assert set(lv) == {"weights", "acts"} and all(isinstance(v, int) and v >= 2 for v in lv.values())
        # a cell using more levels than its bits allow says so
        assert ("not 4-bit" in cell["note"]) == (max(lv.values()) > 16)
        cells[cid] = cell
        extra[cid] = json.loads((folder / "peer.json").read_text())
        assert (folder / "model.pt").stat().st_size == extra[cid]["physical_bytes"]
        conf = extra[cid]["config"]
        assert conf["data"]["name"] == "digits" and conf["data"]["train_subset"] == 128
        if pct is not None:
            assert conf["recipe"]["prune"]["sparsity"] == pct / 100
    assert len({c["dense_accuracy"] for c in cells.values()}) == 1  # one dense network for all

    for pct in (50, 75):
        c = {n: cells[f"peer_{n}_{pct}_s0"] for n in peers.PEERS if n not in peers.UNPRUNED}
        c["brevitas_dense"] = cells["peer_brevitas_dense_s0"]
        e = {n: extra[f"peer_{n}_{pct}_s0"] for n in peers.PEERS if n not in peers.UNPRUNED}
        e["brevitas_dense"] = extra["peer_brevitas_dense_s0"]
        def keep(n: int, pct: int = pct) -> int:  # channels kept of n
            return n * (100 - pct) // 100

        # Levels: prunequant saturates to 16 codes, Brevitas' narrow-range weights use at most 15.
        assert c["tp_pq"]["levels"]["weights"] <= 16 and c["tp_pq"]["levels"]["acts"] <= 16
        for b in ("brevitas_dense", "brevitas_tp"):
            assert c[b]["levels"]["weights"] <= 15 and c[b]["levels"]["acts"] <= 16
        assert c["qsparse"]["levels"]["acts"] <= 16  # its activation quantizer clamps to 2^b codes
        for name in ("tp_pq", "brevitas_tp"):  # these saturate to the b-bit range
            levels = json.loads((tmp_path / f"peer_{name}_{pct}_s0" / "levels.json").read_text())
            assert levels["codes_outside_range"] == [] and levels["weight_layers"]
        # Torch-Pruning really shrinks: fewer channels (residual stream included), params, MACs.
        for name in ("tp_pq", "brevitas_tp"):
            ch = e[name]["channels"]
            assert e[name]["shrunk"] is True
            assert ch["after"]["conv1"] == keep(ch["dense"]["conv1"])  # the stem feeds the residual adds
            assert ch["after"]["layer3.2.conv1"] == keep(ch["dense"]["layer3.2.conv1"])
            assert ch["after"]["fc"] == ch["dense"]["fc"]  # the classifier is left alone
            assert c[name]["params"] < 0.4 * c["brevitas_dense"]["params"]
            assert c[name]["macs"] < 0.4 * c["brevitas_dense"]["macs"]
        # the same shrunk network at the same bits: the same cost whichever tool quantizes it
        for k in ("memory_mbit", "macs", "bops"):
            assert c["tp_pq"][k] == pytest.approx(c["brevitas_tp"][k])
        assert e["brevitas_tp"]["physical_bytes"] < 0.5 * e["brevitas_dense"]["physical_bytes"]
        # qsparse masks (not shrunk) the sparsity's share of every block-internal channel set
        q = e["qsparse"]
        assert q["shrunk"] is False and "not shrunk" in c["qsparse"]["note"]
        assert len(q["kept_channels"]) == 9 and all(k == keep(n) for k, n in q["kept_channels"].values())
        assert tp_memory_order(c)
    for name in ("qsparse", "tp_pq", "brevitas_tp"):  # 75 % costs less than 50 %
        for k in ("memory_mbit", "macs", "bops"):
            assert cells[f"peer_{name}_75_s0"][k] < cells[f"peer_{name}_50_s0"][k]

    # grid.py's table collects the peer cells with its own, one group and one table per sparsity
    collected, problems = peers.grid.collect(tmp_path)
    assert not problems and {c["id"] for c in collected} == set(ids)
    summary = peers.grid.table(tmp_path, plots=False)
    assert summary["subgrids"]["peers"] == [
        "peer_brevitas_tp_75", "peer_qsparse_75", "peer_tp_pq_75",
        "peer_brevitas_tp_50", "peer_qsparse_50", "peer_tp_pq_50", "peer_brevitas_dense"]
    md = (tmp_path / "grid.md").read_text()
    at75, at50 = md.index("## Peers at 75 %"), md.index("## Peers at 50 %")
    assert at75 < md.index(f"| {cells['peer_qsparse_75_s0']['label']} ") < at50
    unpruned = md.index("## Peers without pruning")
    assert at50 < md.index(f"| {cells['peer_qsparse_50_s0']['label']} ") < unpruned
    assert "peers.py --quick" in md  # the command that ran the cells

    # Resuming: finished cells are skipped, nothing is computed again.
    stamps = {i: (tmp_path / i / "cell.json").stat().st_mtime_ns for i in ids}

    def fail(*a, **k):
        raise AssertionError("a finished cell was computed again")

    monkeypatch.setattr(peers, "RUNNERS", dict.fromkeys(peers.RUNNERS, fail))
    monkeypatch.setattr(peers, "train_dense", fail)
    assert peers.main(args) == 0
    assert stamps == {i: (tmp_path / i / "cell.json").stat().st_mtime_ns for i in ids}

    # An unfinished cell another process holds (grid.py's lock) is left to it.
    (tmp_path / "peer_tp_pq_75_s0" / "cell.json").unlink()
    assert peers.grid.claim(tmp_path, "peer_tp_pq_75_s0")
    try:
        assert peers.main(args) == 0
    finally:
        peers.grid.release(tmp_path, "peer_tp_pq_75_s0")
    assert not (tmp_path / "peer_tp_pq_75_s0" / "cell.json").exists()
    out = capsys.readouterr().out
    assert "peer_tp_pq_75_s0: claimed by another process, left to it" in out
    assert "peer_tp_pq_50_s0: finished, skipped" in out


def tp_memory_order(cells: dict) -> bool:
    """Pruning and quantizing cost less memory than quantizing alone."""
    dense = cells["brevitas_dense"]["memory_mbit"]
    return all(cells[n]["memory_mbit"] < dense for n in ("qsparse", "tp_pq", "brevitas_tp"))
