"""The ranking analysis (METHOD section 7): the comparison math against direct formulas, and the
analysis driver on networks whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunequant.models import build_model
from prunequant.prune.mask import mask_from_scores
from prunequant.prune.ranking import compare, edit_distance, kendall_tau, kept_overlap, rank_sequence
from prunequant.recipe import PruneConfig, RecipeError
from prunequant.train.analyze import (
    analyze_ranking,
    check_measures,
    check_sparsities,
    preceding_sites,
)
from prunequant.train.compressor import Compressor


def direct_tau(mu: list[float], nu: list[float]) -> float:
    """The paper's formula with a numpy sign matrix: 2/(n(n-1)) sum_{k<j} sign(mu_k-mu_j) sign(nu_k-nu_j)."""
    a, b = np.asarray(mu, dtype=float), np.asarray(nu, dtype=float)
    n = a.size
    s = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    return 2.0 / (n * (n - 1)) * float(np.triu(s, k=1).sum())


pairs = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 5), min_size=n, max_size=n),  # few values: many ties
    st.lists(st.integers(0, 5), min_size=n, max_size=n)))


@settings(deadline=None)  # the first example imports scipy
@given(pairs)
def test_tau_is_the_papers_formula_with_ties(p: tuple[list[int], list[int]]) -> None:
    mu, nu = p
    assert kendall_tau(mu, nu) == pytest.approx(direct_tau(mu, nu), abs=1e-12)


@settings(deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=50, unique=True))
def test_tau_identical_is_one_reversed_is_minus_one(x: list[float]) -> None:
    assert kendall_tau(x, x) == 1.0
    assert kendall_tau(x, [-v for v in x]) == -1.0
    assert direct_tau(x, x) == pytest.approx(1.0)


def test_tau_edge_cases() -> None:
    assert kendall_tau([1, 1, 1], [1, 2, 3]) == 0.0  # every sign of mu is 0
    assert math.isnan(kendall_tau([1.0], [2.0]))  # no pair
    assert kendall_tau(torch.tensor([3.0, 1.0, 2.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1, 2, 3])


@settings(deadline=None)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=40), st.floats(0.0, 0.99))
def test_rank_sequence_keeps_what_mask_from_scores_keeps(scores: list[int], s: float) -> None:
    t = torch.tensor(scores, dtype=torch.float32)
    order = rank_sequence(t)
    assert sorted(order) == list(range(len(scores)))
    assert all(scores[a] >= scores[b] for a, b in zip(order, order[1:]))
    mask = mask_from_scores(t, s)
    k = int(mask.sum())
    assert set(order[:k]) == set(torch.nonzero(mask).flatten().tolist())


def test_edit_distance_and_overlap_known_values() -> None:
    assert edit_distance([0, 1, 2, 3], [0, 1, 2, 3]) == 0
    assert edit_distance([0, 1, 2, 3], [1, 2, 3, 0]) == 2  # delete the front, insert it at the end
    assert edit_distance([0, 1, 2, 3], [3, 2, 1, 0]) == 4
    assert edit_distance([300, 7], [7, 300]) == 2  # ints are symbols, not characters
    assert kept_overlap([1, 1, 0, 0], [0, 1, 1, 0]) == 0.5
    assert kept_overlap(torch.tensor([1.0, 0, 1, 0]), torch.tensor([1.0, 0, 1, 0])) == 1.0
    r = compare([4, 3, 2, 1], [1, 2, 3, 4], [1, 1, 0, 0], [0, 0, 1, 1])
    assert r == {"tau": -1.0, "edit_distance": 4, "edit_distance_norm": 1.0, "kept_overlap": 0.0,
                 "ranking": [3, 2, 1, 0]}


def test_measure_and_sparsity_checks() -> None:
    with pytest.raises(RecipeError, match="did you mean 'a_l1'"):
        check_measures(["a_l2"])
    assert check_measures(["w_l1", "a_l1", "w_l1"]) == ["w_l1", "a_l1"]
    for bad in ("0", "1", "1.5", "-0.2", "x", "nan"):
        with pytest.raises(RecipeError, match="--sparsities"):
            check_sparsities([bad])
    assert check_sparsities(["0.25", 0.5]) == [0.25, 0.5]


def known_mlp() -> nn.Sequential:
    """fc0 -> ReLU -> fc2 -> ReLU -> fc4 on the input x = ones(4).

    Site "0" (fc0's 4 channels) outputs diag(1, 2, 3, 4) x = [1, 2, 3, 4]: A-L1 removes channel 0 at
    25 %, channels 0-1 at 50 %, channels 0-2 at 75 %. Site "2" (fc2 = diag(10, 4, 2, 1): channel c
    reads only channel c of site "0") then has A-L1 [10, 8, 6, 4] dense and
    [0, 8, 6, 4] / [0, 0, 6, 4] / [0, 0, 0, 4] with site "0" pruned 25 / 50 / 75 %.
    """
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.diag(torch.tensor([1.0, 2, 3, 4])))
        m[2].weight.copy_(torch.diag(torch.tensor([10.0, 4, 2, 1])))
        m[0].bias.zero_()
        m[2].bias.zero_()
    return m


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_known_answer_a_l1(mode: str) -> None:
    """Hand-computed (dense ranking 0,1,2,3; target sparsity 0.5 keeps channels {0, 1} dense):

    * 25 %: nu = [0, 8, 6, 4]: pairs with channel 0 discordant (-3), the other 3 concordant:
      tau = 0; ranking 1,2,3,0 (edit distance 2); kept {1, 2}: overlap 1/2.
    * 50 %: nu = [0, 0, 6, 4]: (0,1) tied, (2,3) concordant, 4 discordant: tau = 2/12 * (-3) = -0.5;
      ranking 2,3,1,0 (a tie puts the higher index first), edit distance 4; kept {2, 3}: overlap 0.
    * 75 %: nu = [0, 0, 0, 4]: 3 tied pairs, 3 discordant: tau = -0.5; ranking 3,2,1,0, edit 4, overlap 0.
    """
    m = known_mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.ones(8, 4)
    r = analyze_ranking(m, x, [x, x], measures=["a_l1", "a_l0"], mode=mode)
    first, second = r["sites"]
    assert first["name"] == "0" and first["predecessor"] is None and first["predecessor_via"] is None
    assert first["measures"]["a_l1"]["preceding"] is None
    assert first["measures"]["a_l1"]["dense_scores"] == [1.0, 2.0, 3.0, 4.0]
    assert second["predecessor"] == "0" and second["predecessor_via"] == "graph"
    a = second["measures"]["a_l1"]
    assert a["dense_scores"] == [10.0, 8.0, 6.0, 4.0] and a["dense_ranking"] == [0, 1, 2, 3]
    want = {"0.25": (3, [0, 8, 6, 4], [1, 2, 3, 0], 0.0, 2, 0.5),
            "0.5": (2, [0, 0, 6, 4], [2, 3, 1, 0], -0.5, 4, 0.0),
            "0.75": (1, [0, 0, 0, 4], [3, 2, 1, 0], -0.5, 4, 0.0)}
    for s, (pkept, scores, ranking, tau, ed, ov) in want.items():
        got = a["preceding"][s]
        assert got["predecessor_kept"] == pkept
        assert got["scores"] == scores and got["ranking"] == ranking
        assert got["tau"] == tau and got["edit_distance"] == ed and got["kept_overlap"] == ov
        assert got["edit_distance_norm"] == ed / 4
    assert r["summary"]["a_l1"]["0.5"]["mean_tau"] == -0.5
    # A-L0: every channel of site "2" is non-zero on every input when dense: all tied, so every sign
    # of the dense estimate is 0 and tau is 0 whatever the pruned estimate is.
    l0 = second["measures"]["a_l0"]
    assert l0["dense_scores"] == [1.0, 1.0, 1.0, 1.0]
    assert l0["preceding"]["0.25"]["scores"] == [0.0, 1.0, 1.0, 1.0]
    assert all(l0["preceding"][s]["tau"] == 0.0 for s in want)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the model is not touched
    assert "strongly" in r["reading"]


def test_w_l1_does_not_depend_on_the_preceding_mask() -> None:
    """W-L1 reads the layer's own weights: tau exactly 1, no edits, the same kept set, on every site."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8, width=0.25).eval()
    x = torch.randn(4, 1, 8, 8)
    r = analyze_ranking(model, x, [x], measures=["w_l1"], prune=PruneConfig(sparsity=0.5))
    assert len(r["sites"]) == 9
    for site in r["sites"][1:]:
        for got in site["measures"]["w_l1"]["preceding"].values():
            assert got["tau"] == 1.0 and got["edit_distance"] == 0 and got["kept_overlap"] == 1.0
    assert r["summary"]["w_l1"]["0.75"] == {"layers": 8, "mean_tau": 1.0, "min_tau": 1.0,
                                            "mean_edit_distance": 0.0, "mean_edit_distance_norm": 0.0,
                                            "mean_kept_overlap": 1.0}
    assert "hardly" in r["reading"]


def test_preceding_sites_follow_the_graph() -> None:
    """ResNet-20: a block's conv1 reads the previous block's conv1 channels through its conv2 and the
    residual add; the first block has none."""
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8, width=0.25)
    comp = Compressor(model, {"prune": {"sparsity": 0.5}, "quant": None}, torch.randn(2, 1, 8, 8),
                      steps_per_epoch=1)
    got = dict(zip([s.name for s in comp.plan.sites], preceding_sites(comp.model, comp.plan)))
    assert got["layer1.0.conv1"] == (None, None)
    assert got["layer1.1.conv1"] == ("layer1.0.conv1", "graph")
    assert got["layer2.0.conv1"] == ("layer1.2.conv1", "graph")
    assert got["layer3.2.conv1"] == ("layer3.1.conv1", "graph")


class TwoBranches(nn.Module):
    """Two convs on the input, concatenated: branch b has no mask upstream (plan-order fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.d(torch.relu(self.c(h)))


def test_preceding_site_falls_back_to_plan_order() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6)
    r = analyze_ranking(TwoBranches(), x, [x], measures=["a_l1"], sparsities=[0.5])
    got = {s["name"]: (s["predecessor"], s["predecessor_via"]) for s in r["sites"]}
    assert got == {"a": (None, None), "b": ("a", "plan_order"), "c": ("b", "graph")}
    # b does not read a, so pruning a cannot change b's ranking
    assert r["sites"][1]["measures"]["a_l1"]["preceding"]["0.5"]["tau"] == 1.0
