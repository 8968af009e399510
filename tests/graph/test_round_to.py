"""round_to: kept channel counts at multiples of 8 / 16, through the Compressor and shrink()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunequant import Compressor, Recipe, RecipeError
from prunequant.graph import shrink
from prunequant.models import MobileNetV2, resnet20
from prunequant.prune.mask import mask_from_scores


@pytest.mark.parametrize("c", [8, 10, 16, 24, 32, 40, 64, 96])
@pytest.mark.parametrize("s", [0.1, 0.25, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("r", [8, 16])
def test_mask_rounding(c: int, s: float, r: int) -> None:
    scores = torch.rand(c, generator=torch.Generator().manual_seed(c))
    plain = mask_from_scores(scores, s)
    m = mask_from_scores(scores, s, round_to=r)
    kept, kept_plain = int(m.sum()), int(plain.sum())
    assert kept >= kept_plain  # never prunes more
    possible = [k for k in range(kept_plain, c + 1) if k % r == 0 and k >= 1]
    if possible:
        assert kept == possible[0]
    else:
        assert kept == kept_plain
    # The kept channels are the best ones.
    if kept < c:
        assert scores[m == 1].min() >= scores[m == 0].max()


def test_mask_structure() -> None:
    scores = torch.arange(16.0).flip(0)
    m = mask_from_scores(scores, 0.5, parts=4)
    assert m.reshape(4, 4).sum(dim=1).tolist() == [2, 2, 2, 2]
    m = mask_from_scores(scores, 0.5, block=4)
    b = m.reshape(4, 4)
    assert bool((b.all(dim=1) | ~b.bool().any(dim=1)).all()) and int(m.sum()) == 8
    m = mask_from_scores(torch.rand(32), 0.75, parts=2, round_to=8)
    assert int(m.sum()) == 8 and m.reshape(2, 16).sum(dim=1).tolist() == [4, 4]
    with pytest.raises(ValueError):
        mask_from_scores(torch.rand(10), 0.5, parts=3)
    with pytest.raises(ValueError):
        mask_from_scores(torch.rand(10), 0.5, round_to=0)


def test_recipe_validation() -> None:
    assert Recipe.from_dict({"prune": {"round_to": 8}}).prune.round_to == 8
    assert Recipe.from_dict({}).prune.round_to is None
    with pytest.raises(RecipeError, match="round_to"):
        Recipe.from_dict({"prune": {"round_to": 0}})


@pytest.mark.parametrize("build,sparsity", [(lambda: resnet20(), 0.3), (lambda: MobileNetV2(width=0.5), 0.5)])
def test_compressor_round_to_then_shrink(build, sparsity: float) -> None:
    torch.manual_seed(0)
    model = build()
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    recipe = {"prune": {"sparsity": sparsity, "importance": "a_l1", "unit": "steps", "start": 0,
                        "interval": 1, "refresh": 1, "round_to": 8}, "quant": None}
    comp = Compressor(model, recipe, x)
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.01)
    for _ in range(comp.total_steps_hint + 1):
        loss = F.cross_entropy(comp.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.step()
    assert comp.pruning_done
    final = comp.finalize(shrink=False)  # the masked model
    small = shrink(final)
    default = comp.finalize()  # finalize() shrinks by default
    assert [s.channels for s in default.pq_plan.sites] == [s.channels for s in small.pq_plan.sites]
    for s in small.pq_plan.sites:
        assert s.channels % 8 == 0 or s.channels == final.pq_plan.site(s.name).channels
    assert any(s.channels < final.pq_plan.site(s.name).channels for s in small.pq_plan.sites)
    with torch.no_grad():
        a, b = final(x), small(x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
