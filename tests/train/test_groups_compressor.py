"""Channel groups driven by the Compressor: the recipe field, importance per group, patterns, the
layerwise order, finalize == masked, save / load, and the packed and ONNX exports of the result."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunequant import Compressor, Recipe, RecipeError
from prunequant.graph import load_pruned, save_pruned
from prunequant.models import build_model

IMG = 16
PRUNE = {"unit": "steps", "start": 1, "interval": 2, "refresh": 1, "sparsity": 0.5, "groups": True}
QUANT = {"unit": "steps", "weight_bits": 4, "act_bits": 4, "weight_delay": 1, "act_delay": 1,
         "first_last_bits": 8}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet20", num_classes=10, in_channels=1, image_size=IMG, width=0.5)


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, IMG, IMG, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def _x() -> torch.Tensor:
    return torch.randn(4, 1, IMG, IMG, generator=torch.Generator().manual_seed(5))


def _run(prune: dict, quant: dict | None = QUANT, steps: int | None = None, seed: int = 0) -> Compressor:
    recipe = Recipe.model_validate({"prune": prune, "quant": quant})
    comp = Compressor(_model(seed), recipe, _x())
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.02, momentum=0.9)
    comp.model.train()
    for x, y in _batches(steps or comp.total_steps_hint + 2):
        loss = F.cross_entropy(comp.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.step()
    return comp


def test_groups_from_the_recipe_finalize_equals_masked(tmp_path) -> None:
    comp = _run(PRUNE)
    names = [s.name for s in comp.plan.sites]
    assert names[0] == "group:conv1" and sum(n.startswith("group:") for n in names) == 3
    for s in comp.plan.sites:  # every site and group at its target (A-L1, floor(s * C) removed)
        assert comp.model.get_submodule(s.mask).kept == s.channels - math.floor(0.5 * s.channels)
    final = comp.finalize()
    x = _x()
    comp.model.eval()
    with torch.no_grad():
        assert torch.allclose(final(x), comp.model(x), atol=1e-5)
    assert final.conv1.out_channels == 4 and final.fc.in_features == 16  # the stem and the last stream
    path = save_pruned(final, tmp_path / "m")
    back = load_pruned(_model(), path, x)
    with torch.no_grad():
        assert torch.equal(back(x), final(x))
    import onnxruntime as ort

    from prunequant.export import export_onnx, load_packed, save_packed

    onnx_path = export_onnx(final, x[:1], tmp_path / "m.onnx", format="qdq")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's meaning
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = final(x)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert float((got - ref).abs().max()) < 1e-3 * float(ref.abs().max())
    packed = save_packed(final, tmp_path / "m.pq", example_input=x)
    with torch.no_grad():
        assert torch.equal(load_packed(packed, _model)(x), ref)


def test_group_importance_is_measured_on_the_group() -> None:
    """A-L1 of a group: the aggregate of its points; max and mean give different rankings in general."""
    comps = {agg: _run({**PRUNE, "group_stat": agg}, quant=None, seed=3) for agg in ("mean", "max")}
    for agg, comp in comps.items():
        for s in comp.plan.sites:
            m = comp.model.get_submodule(s.mask)
            if s.kind == "group":
                assert m.points > 1 and m.aggregate == agg and bool((m.stat_count > 0).all())


def test_group_patterns() -> None:
    comp = _run({**PRUNE, "per_layer": {"group:*": 0.25}, "exclude": ["layer3.1.conv2"]}, quant=None)
    groups = {s.name: s for s in comp.plan.sites if s.kind == "group"}
    assert set(groups) == {"group:conv1", "group:layer2.0.conv2"}
    assert comp.plan.skipped["group:layer3.0.conv2"] == "excluded by pattern (member 'layer3.1.conv2')"
    for s in groups.values():
        assert comp.model.get_submodule(s.mask).kept == s.channels - math.floor(0.25 * s.channels)
    _run({**PRUNE, "exclude": ["group:conv1"]}, quant=None, steps=1)  # a group name is a valid pattern
    with pytest.raises(RecipeError, match="group:conv"):
        _run({**PRUNE, "per_layer": {"group:stem": 0.3}}, quant=None, steps=1)


def test_groups_off_is_the_paper_placement() -> None:
    comp = _run({k: v for k, v in PRUNE.items() if k != "groups"}, quant=None, steps=1)
    assert all(s.kind == "site" for s in comp.plan.sites) and "groups" not in comp.plan.options
    assert Recipe().prune.groups is False


def test_w_l1_group_importance_averages_the_producers() -> None:
    comp = _run({**PRUNE, "importance": "w_l1"}, quant=None, steps=1)
    i = [s.name for s in comp.plan.sites].index("group:conv1")
    s = comp.plan.sites[i]
    expect = torch.stack([comp._weight_l1(p) for p in s.producers]).mean(dim=0)
    assert torch.equal(comp._scores(i), expect) and len(s.producers) == 4
