"""save_pruned / load_pruned: weights + JSON record, rebuilt from the model code, identical outputs."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from gtools import build
from zoo import ZOO, randomize

from prunequant.graph import GraphError, load_pruned, save_pruned, shrink


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


def test_loading_never_unpickles(tmp_path) -> None:
    _, gm, x = build("mlp")
    save_pruned(gm, tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    # A weights file that carries an arbitrary object (and a record whose checksum matches it).
    evil = tmp_path / "weights.pt"
    torch.save({"fc1.bias": Evil()}, evil, pickle_module=pickle)
    rec = json.loads((tmp_path / "pruning.json").read_text())
    import hashlib

    rec["sha256"] = hashlib.sha256(evil.read_bytes()).hexdigest()
    (tmp_path / "pruning.json").write_text(json.dumps(rec))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_pruned(randomize(ZOO["mlp"][0]()), tmp_path, x)


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
