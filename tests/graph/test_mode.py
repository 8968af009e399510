"""Train / eval mode: traced, instrumented and shrunk models follow ``.train()`` / ``.eval()`` (issue 11).

torch.fx records ``self.training`` as the constant it had while tracing; :func:`prunequant.graph.trace`
turns every read into a node that reads the GraphModule's flag at run time. The original model is
the oracle: in eval mode the instrumented model (masks all 1, no quantizers) computes exactly its
outputs and the shrunk model the masked one's; in train mode, from the same RNG seed, both draw
exactly the same dropout masks (the ops run in the same order).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gtools import set_masks
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from tvshim import import_torchvision

from prunequant.graph import GraphError, instrument, shrink, trace
from prunequant.graph.trace import is_mode_node

tv = import_torchvision()


class Noise(nn.Module):
    """Python control flow on the mode and no layer: kept as an opaque call."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return x + 0.5 * torch.randn_like(x)
        return x


class FuncNorm(nn.Module):
    """Norms written with functionals that take the mode as an argument."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(0.5 + torch.rand(c))
        self.bias = nn.Parameter(0.1 * torch.randn(c))
        self.register_buffer("running_mean", 0.1 * torch.randn(c))
        self.register_buffer("running_var", 0.5 + torch.rand(c))
        self.register_buffer("in_mean", 0.1 * torch.randn(c))
        self.register_buffer("in_var", 0.5 + torch.rand(c))

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training)
        return F.instance_norm(x, self.in_mean, self.in_var, use_input_stats=self.training, momentum=0.1)


class Drops(nn.Module):
    """Every mode-dependent op: functional dropouts, stochastic depth, functional norms, a branch."""

    def __init__(self):
        super().__init__()
        self.noise = Noise()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.sd = tv.ops.StochasticDepth(0.5, "row")
        self.c4 = nn.Conv2d(16, 16, 1)
        self.fnorm = FuncNorm(16)
        self.c1d = nn.Conv1d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.noise(x)
        x = F.relu(self.bn1(self.c1(x)))
        x = F.dropout(x, 0.3, self.training)
        x = F.relu(self.c2(x))
        x = F.dropout2d(x, p=0.3, training=self.training)
        x = tv.ops.stochastic_depth(x, 0.4, "batch", self.training)
        x = self.sd(F.relu(self.c3(x)))
        x = F.relu(self.fnorm(self.c4(x)))
        x = F.dropout3d(x.unsqueeze(2), 0.2, self.training).squeeze(2)
        x = F.alpha_dropout(x, 0.2, self.training)
        x = F.feature_alpha_dropout(x, 0.2, self.training)
        y = F.relu(self.c1d(x.flatten(2)))
        y = F.dropout1d(y, 0.3, self.training)
        return self.fc(y.mean(2))


def _x(shape=(4, 3, 8, 8), seed: int = 5) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _drops(mode: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Drops().train(mode == "train"), _x()


def _seeded(model: nn.Module, x: Tensor, seed: int) -> Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


@pytest.mark.parametrize("built", ["train", "eval"])
def test_eval_mode_matches_the_original(built: str) -> None:
    model, x = _drops(built)
    gm, plan = instrument(model, example_input=x)
    # Dropouts and stochastic depth pass the channels through: those sites stay prunable.
    assert {s.name for s in plan.sites} == {"c1", "c2", "c3", "c1d"}, plan.skipped
    assert "noise" in gm.pq_leaves
    model.eval()
    gm.eval()
    with torch.no_grad():
        ref = model(x)
        out, again = gm(x), gm(x)
    assert torch.equal(out, ref)
    assert torch.equal(again, out)
    set_masks(gm)
    small = shrink(gm).eval()
    with torch.no_grad():
        masked = gm(x)
        assert _rel(small(x), masked) < 1e-5
        assert torch.equal(small(x), small(x))


@pytest.mark.parametrize("built", ["train", "eval"])
def test_train_mode_draws_like_the_original(built: str) -> None:
    model, x = _drops(built)
    gm, _ = instrument(model, example_input=x)  # a_l1 masks gather statistics in train mode
    small = shrink(gm)  # all masks 1: the same network
    model.train()
    gm.train()
    small.train()
    ref = _seeded(model, x, 11)
    assert torch.equal(_seeded(gm, x, 11), ref)
    assert torch.equal(_seeded(small, x, 11), ref)
    # It does drop: another seed, or eval mode, gives other outputs.
    assert not torch.equal(_seeded(gm, x, 12), ref)
    gm.eval()
    assert _rel(_seeded(gm, x, 11), ref) > 0.05


def test_model_built_in_eval_mode_drops_after_train() -> None:
    model, x = _drops("eval")
    gm, _ = instrument(model, prune_stat="none", example_input=x)
    set_masks(gm)
    small = shrink(gm)
    gm.train()
    small.train()
    model.train()
    for net in (gm, small):
        a, b = _seeded(net, x, 1), _seeded(net, x, 2)
        assert _rel(a, b) > 0.05  # stochastic
        assert torch.equal(_seeded(net, x, 1), a)  # and only through the RNG


def test_dropout_rate_of_shrunk_model_in_train_mode() -> None:
    """Statistical check where draws cannot match: the shrunk model's dropout zeroes ~30 % after c2."""
    model, x = _drops("eval")
    gm, _ = instrument(model, prune_stat="none", example_input=x)
    set_masks(gm)
    small = shrink(gm).train()
    node = next(n for n in small.graph.nodes if n.op == "call_function" and n.target is F.dropout2d)
    got: list[Tensor] = []

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is node:
                got.append(out)
            return out

    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            Rec(small).run(x)
    ch = torch.cat([(o.abs().sum(dim=(2, 3)) == 0).flatten() for o in got]).float()
    assert len(ch) >= 400  # kept channels x 4 samples x 20 passes
    assert 0.2 < float(ch.mean()) < 0.4  # whole channels dropped at p = 0.3
    small.eval()
    got.clear()
    with torch.no_grad():
        Rec(small).run(x)
    assert float((got[0].abs().sum(dim=(2, 3)) == 0).float().mean()) < 0.1  # eval: nothing dropped


@settings(max_examples=15, deadline=None)
@given(modes=st.lists(st.booleans(), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_follows_any_sequence_of_modes(modes: list[bool], seed: int) -> None:
    model, x = _drops("train" if seed % 2 else "eval")
    gm = trace(model)
    for training in modes:
        model.train(training)
        gm.train(training)
        assert torch.equal(_seeded(gm, x, seed), _seeded(model, x, seed))


def test_submodule_modes_follow_like_the_original() -> None:
    """Mode set per submodule (here stochastic depth off only): the flag is read at each module's path."""
    model, x = _drops("train")
    gm = trace(model)
    for net in (model, gm):
        net.train()
        net.get_submodule("sd").eval()
    assert torch.equal(_seeded(gm, x, 4), _seeded(model, x, 4))
    assert any(is_mode_node(n) and n.target == "sd.training" for n in gm.graph.nodes)


def test_tracing_leaves_the_original_modes_alone() -> None:
    model, x = _drops("train")
    model.bn1.eval()  # a frozen BatchNorm in a model in train mode
    before = {n: m.training for n, m in model.named_modules()}
    gm, _ = instrument(model, example_input=x)
    after = {n: m.training for n, m in model.named_modules()}
    assert after == before
    assert all(type(m.__dict__["training"]) is bool for m in model.modules())
    assert gm.get_submodule("bn1") is model.bn1 and not gm.bn1.training


class ChildFlag(nn.Module):
    """Reads a child's flag: ``self.drop.training`` (and calls a child's ``forward`` directly)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.4)
        self.sd = tv.ops.StochasticDepth(0.5, "row")
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(F.relu(self.c1(x)), self.drop.p, self.drop.training)
        x = self.sd.forward(x)
        return self.fc(x.mean([2, 3]))


def test_child_flags_and_direct_forward_calls_follow_the_mode() -> None:
    torch.manual_seed(0)
    model, x = ChildFlag().eval(), _x()
    gm, plan = instrument(model, example_input=x)
    assert [s.name for s in plan.sites] == ["c1"]
    for net in (model, gm):  # only the children: the root's own flag is not read
        net.drop.train()
        net.sd.train()
    ref = _seeded(model, x, 6)
    assert torch.equal(_seeded(gm, x, 6), ref)
    assert not torch.equal(_seeded(gm, x, 7), ref)
    gm.eval()
    model.eval()
    assert torch.equal(_seeded(gm, x, 6), _seeded(model, x, 7))


class ConvBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            x = F.dropout(x, 0.5)
        return F.relu(self.conv(x))


class BranchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.blk = ConvBranch()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blk(F.relu(self.c1(x))).mean([2, 3]))


class RootBranch(BranchNet):
    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.c1(x))
        if self.training:
            x = x * 2
        return self.fc(x.mean([2, 3]))


def test_module_with_layers_branching_on_mode_is_named() -> None:
    """The branch changes the graph: refused, naming the module (and exclude where it helps)."""
    with pytest.raises(GraphError, match=r"module 'blk' \(ConvBranch\) branches on self\.training.*"
                                         r"differs between the two modes.*'blk' to prune\.exclude"):
        instrument(BranchNet(), example_input=_x())
    with pytest.raises(GraphError, match=r"RootBranch\.forward branches on self\.training.*differs"):
        instrument(RootBranch(), example_input=_x())


class AuxHead(BranchNet):
    """GoogLeNet / Inception style: an auxiliary output only in train mode, switched off here."""

    def __init__(self, aux: bool):
        super().__init__()
        self.aux = aux
        self.aux_fc = nn.Linear(8, 3)

    def forward(self, x: Tensor):
        x = F.relu(self.c1(x))
        aux = self.aux_fc(x.mean([2, 3])) if self.training and self.aux else None
        x = F.dropout(self.blk.conv(x), 0.3, self.blk.training)
        out = self.fc(x.mean([2, 3]))
        if self.training and self.aux:
            return out, aux
        return out


def test_branch_that_does_not_change_the_graph_is_kept() -> None:
    """``if self.training and self.aux:`` with ``aux`` False: the same graph in both modes, traced once."""
    torch.manual_seed(0)
    model, x = AuxHead(aux=False), _x()
    gm, plan = instrument(model, example_input=x)
    assert [s.name for s in plan.sites] == ["c1"]
    for training in (True, False, True):
        model.train(training)
        gm.train(training)
        assert torch.equal(_seeded(gm, x, 5), _seeded(model, x, 5))
    assert not torch.equal(_seeded(gm, x, 5), _seeded(gm, x, 6))  # the dropout's flag is still live
    with pytest.raises(GraphError, match=r"AuxHead\.forward branches on self\.training.*differs"):
        instrument(AuxHead(aux=True), example_input=x)


def test_torchvision_googlenet_without_aux_logits_follows_the_mode() -> None:
    torch.manual_seed(0)
    model = tv.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    x = _x((2, 3, 64, 64))
    gm, _ = instrument(model, prune_stat="none", example_input=x)
    for training in (False, True):
        model.train(training)
        gm.train(training)
        assert torch.equal(_seeded(gm, x, 8), _seeded(model, x, 8))


def test_excluded_branching_module_follows_the_mode() -> None:
    torch.manual_seed(0)
    model, x = BranchNet(), _x()
    gm, plan = instrument(model, exclude=["blk"], example_input=x)
    assert gm.pq_leaves == ["blk"]
    for training in (True, False, True):
        model.train(training)
        gm.train(training)
        assert torch.equal(_seeded(gm, x, 9), _seeded(model, x, 9))
    assert not torch.equal(_seeded(gm, x, 9), _seeded(gm, x, 10))


def test_state_dict_unchanged_by_mode_nodes() -> None:
    model, x = _drops("train")
    gm, _ = instrument(model, prune_stat=None, example_input=x)
    assert set(gm.state_dict()) == set(model.state_dict())
    clone = copy.deepcopy(gm).eval()
    with torch.no_grad():
        assert torch.equal(clone(x), model.eval()(x))


# ------------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_tiny"])
def test_torchvision_follows_the_mode(name: str) -> None:
    from zoo import randomize

    torch.manual_seed(0)
    model = randomize(getattr(tv.models, name)(weights=None)).eval()  # built in eval mode (the issue's)
    x = _x((2, 3, 64, 64))
    gm, plan = instrument(model, prune_stat="none", example_input=x)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(gm(x), ref)
        assert torch.equal(gm(x), ref)
    model.train()
    gm.train()
    tref = _seeded(model, x, 21)
    assert torch.equal(_seeded(gm, x, 21), tref)
    assert not torch.equal(_seeded(gm, x, 22), tref)  # stochastic depth / dropout active
    set_masks(gm)
    small = shrink(gm).eval()
    gm.eval()
    with torch.no_grad():
        masked = gm(x)
        assert _rel(small(x), masked) < 1e-5
        assert torch.equal(small(x), small(x))
    small.train()
    assert not torch.equal(_seeded(small, x, 1), _seeded(small, x, 2))


def test_finalized_efficientnet_follows_the_mode() -> None:
    """``Compressor.finalize()`` (the issue's report): eval output == the original's, train drops."""
    from prunequant import Compressor

    torch.manual_seed(0)
    model = tv.models.efficientnet_b0(weights=None).eval()
    x = _x((2, 3, 64, 64))
    prune = {"sparsity": 0.5, "unit": "steps", "start": 1, "interval": 1, "refresh": 1}
    comp = Compressor(model, {"prune": prune, "quant": None}, example_input=x)
    small = comp.finalize(allow_incomplete=True)  # no channel pruned yet: the original network
    with torch.no_grad():
        ref = model.eval()(x)
        assert torch.equal(small(x), ref)
        assert torch.equal(small(x), ref)
    model.train()
    small.train()
    assert torch.equal(_seeded(small, x, 3), _seeded(model, x, 3))
