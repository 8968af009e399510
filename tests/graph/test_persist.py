"""save_pruned / load_pruned: weights + JSON record, rebuilt from the model code, identical outputs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat

import pytest
import torch
from gtools import build
from zoo import ZOO, randomize

from prunequant.graph import GraphError, load_pruned, save_pruned, shrink
from prunequant.graph.persist import record_digest


@pytest.mark.parametrize("name,bits", [("resnet20", None), ("mobilenetv2", 4), ("split", 8), ("unet", None),
                                       ("grouped_se", 4), ("lenet5", 8)])
def test_round_trip(tmp_path, name: str, bits) -> None:
    _, gm, x = build(name, bits=bits)
    small = shrink(gm)
    out = save_pruned(small, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["pruning.json", "weights.pt"]
    record = json.loads((out / "pruning.json").read_text())
    for s in gm.pq_plan.sites:
        kept = (gm.get_submodule(s.mask).mask != 0).nonzero().flatten().tolist()
        assert record["sites"][s.name] == {"channels": s.channels, "kept": kept}
    fresh = ZOO[name][0]()  # fresh weights: everything must come from the file
    loaded = load_pruned(fresh, out, x)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in small.state_dict().items()}


def test_save_masked_model_shrinks_first(tmp_path) -> None:
    _, gm, x = build("vgg_small")
    save_pruned(gm, tmp_path)
    loaded = load_pruned(ZOO["vgg_small"][0](), tmp_path, x)
    with torch.no_grad():
        assert float((loaded(x) - gm(x)).abs().max()) < 1e-5 * float(gm(x).abs().max())


class _Payload:
    """Pickles to ``open(sentinel, "w")``: loading it would create the sentinel file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _reseal(path) -> None:
    """Recompute both checksums of the record, as a deliberate editor could."""
    rec = json.loads((path / "pruning.json").read_text())
    rec["sha256"] = hashlib.sha256((path / "weights.pt").read_bytes()).hexdigest()
    rec["record_sha256"] = record_digest(rec)
    (path / "pruning.json").write_text(json.dumps(rec))


def test_loading_never_unpickles(tmp_path) -> None:
    _, gm, x = build("mlp")
    save_pruned(gm, tmp_path)
    sentinel = tmp_path / "PWNED"
    # A weights file that carries an arbitrary object, and a record whose checksums match it.
    torch.save({"fc1.bias": _Payload(sentinel)}, tmp_path / "weights.pt", pickle_module=pickle)
    _reseal(tmp_path)
    with pytest.raises(GraphError, match="weights.pt holds Python objects, not only tensors; refused"):
        load_pruned(randomize(ZOO["mlp"][0]()), tmp_path, x)
    assert not sentinel.exists()


def test_the_whole_record_is_checksummed(tmp_path) -> None:
    """Editing weight_bits (4 -> 8) would rebuild another model: the record's digest refuses it."""
    _, gm, x = build("mlp", bits=4)
    save_pruned(gm, tmp_path)
    rec = json.loads((tmp_path / "pruning.json").read_text())
    assert rec["version"] == 2 and rec["record_sha256"] == record_digest(rec)
    load_pruned(ZOO["mlp"][0](), tmp_path, x)  # intact: loads
    assert rec["instrument"]["weight_bits"] == 4
    rec["instrument"]["weight_bits"] = 8
    (tmp_path / "pruning.json").write_text(json.dumps(rec))
    with pytest.raises(GraphError, match=r"pruning.json: the record's content differs from its checksum"):
        load_pruned(ZOO["mlp"][0](), tmp_path, x)
    rec["instrument"]["weight_bits"] = 4
    rec["version"] = 1  # an older record (no digest) is refused with a way out
    rec.pop("record_sha256")
    (tmp_path / "pruning.json").write_text(json.dumps(rec))
    with pytest.raises(GraphError, match="unsupported version 1.*re-save"):
        load_pruned(ZOO["mlp"][0](), tmp_path, x)


@pytest.mark.parametrize("damage", ["truncated_record", "truncated_weights_resealed",
                                    "empty_weights_resealed", "missing_weights", "bad_sites_resealed",
                                    "bad_options_resealed"])
def test_every_bad_form_is_a_clear_graph_error(tmp_path, damage: str) -> None:
    _, gm, x = build("mlp", bits=4)
    save_pruned(gm, tmp_path)
    rec_path, w = tmp_path / "pruning.json", tmp_path / "weights.pt"
    rec = json.loads(rec_path.read_text())
    if damage == "truncated_record":
        rec_path.write_text(rec_path.read_text()[:200])
        match = "pruning.json: not valid JSON"
    elif damage == "truncated_weights_resealed":
        w.write_bytes(w.read_bytes()[:-300])
        _reseal(tmp_path)
        match = "weights.pt is not a readable PyTorch tensor file"
    elif damage == "empty_weights_resealed":
        w.write_bytes(b"")
        _reseal(tmp_path)
        match = "weights.pt is not a readable PyTorch tensor file"
    elif damage == "missing_weights":
        w.unlink()
        match = "weights.pt: missing"
    elif damage == "bad_sites_resealed":
        next(iter(rec["sites"].values()))["kept"] = "all"
        rec_path.write_text(json.dumps(rec))
        _reseal(tmp_path)
        match = "malformed record"
    else:
        rec["instrument"]["weight_bits"] = "four"
        rec_path.write_text(json.dumps(rec))
        _reseal(tmp_path)
        match = "'instrument' holds options this prunequant does not accept"
    with pytest.raises(GraphError, match=match):
        load_pruned(ZOO["mlp"][0](), tmp_path, x)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_honour_the_umask(tmp_path, umask: int) -> None:
    _, gm, _x = build("mlp")
    old = os.umask(umask)
    try:
        save_pruned(gm, tmp_path)
    finally:
        os.umask(old)
    for name in ("pruning.json", "weights.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_mismatches_are_clear(tmp_path) -> None:
    _, gm, x = build("mlp")
    save_pruned(gm, tmp_path)
    with pytest.raises(GraphError, match="does not match the record"):
        load_pruned(ZOO["lenet5"][0](), tmp_path, torch.randn(2, 3, 32, 32))
    (tmp_path / "weights.pt").write_bytes((tmp_path / "weights.pt").read_bytes()[:-10])
    with pytest.raises(GraphError, match="checksum"):
        load_pruned(ZOO["mlp"][0](), tmp_path, x)
    with pytest.raises(GraphError, match="pruning.json"):
        load_pruned(ZOO["mlp"][0](), tmp_path / "nowhere", x)
    # No temporary files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruning.json", "weights.pt"]
