"""The op registry (``prunequant.graph.ops.RULES``) is the one source of op knowledge for discovery and
export: every op the channel walker lets channels through has an ONNX emitter, and every spelling of
every op (module class, function, tensor method) survives a round trip: a small net using it,
instrumented at W8A8 with pruning on, masked at random, calibrated, shrunk, exported to QDQ and run
in ONNX Runtime (graph optimization off), computes what PyTorch computes.

Before the registry, discovery accepted ``F.selu``, ``F.celu``, ``F.softsign``, ``nn.Hardshrink``,
``nn.LPPool2d``, ``F.max_pool1d``, ``torch.sum`` ... and the export refused them.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from prunequant.graph.ops import (
    ACT_FUNCTIONS,
    ACT_METHODS,
    ACT_MODULES,
    PASS_FUNCTIONS,
    PASS_METHODS,
    PASS_MODULES,
    REFUSED_FLOWS,
    RULES,
    OpRule,
    rule_of,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore:`nn.functional.upsample")
C = 8  # channels of the site
#: Spellings fx's symbolic tracing never records: in-place operators become the plain ones, and these
#: python functions are traced through (``F.sigmoid`` -> ``x.sigmoid()``, ``F.upsample`` ->
#: ``F.interpolate``); hand-built graphs may still hold them.
NOT_RECORDED = {operator.iadd, operator.imul, F.sigmoid, F.tanh, F.upsample, F.upsample_nearest,
                F.upsample_bilinear}


def _tv():
    from tvshim import import_torchvision

    return import_torchvision()


class ChannelsLastLinear(nn.Module):
    """``nn.Linear`` on an NHWC tensor (MatMul over the last dim), as in ConvNeXt blocks."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# (rule, case id, op factory, input rank, ReLU between the first conv and the op, a site expected)
CASES: list[tuple[str, str, object, int, bool, bool]] = []


def case(rule: str, make, rank: int = 2, act: bool = True, cid: str | None = None, site: bool = True) -> None:
    """``site=False``: discovery does not follow the channels there (the export is still checked)."""
    cid = cid or f"{rule}-{len([c for c in CASES if c[0] == rule])}"
    CASES.append((rule, cid, make, rank, act, site))


for r in (1, 2, 3):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[r]
    convt = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[r]
    case("conv", lambda conv=conv: conv(C, C, 3, padding=1), r)
    case("conv_transpose", lambda convt=convt: convt(C, C, 2, stride=2), r)
case("linear", lambda: nn.Sequential(nn.Flatten(), nn.Linear(C * 64, 16)))
case("linear", lambda: ChannelsLastLinear(C), cid="linear-channels-last", site=False)  # permute
for r, bn, inn in ((1, nn.BatchNorm1d, nn.InstanceNorm1d), (2, nn.BatchNorm2d, nn.InstanceNorm2d),
                   (3, nn.BatchNorm3d, nn.InstanceNorm3d)):
    case("batch_norm", lambda bn=bn: nn.Sequential(bn(C), nn.ReLU()), r, act=False)
    case("instance_norm", lambda inn=inn: nn.Sequential(inn(C, affine=True), nn.ReLU()), r, act=False)
case("group_norm", lambda: nn.Sequential(nn.GroupNorm(2, C), nn.ReLU()), act=False)
case("layer_norm", lambda: nn.LayerNorm(8))
case("layer_norm", lambda: lambda x: F.layer_norm(x, (8, 8), eps=1e-3))

ACTS = {
    "relu": [nn.ReLU, lambda: F.relu, lambda: torch.relu, lambda: lambda x: x.relu()],
    "relu6": [nn.ReLU6, lambda: F.relu6],
    "hardtanh": [lambda: nn.Hardtanh(-0.5, 0.7), lambda: lambda x: F.hardtanh(x, -0.5, 0.7)],
    "leaky_relu": [lambda: nn.LeakyReLU(0.2), lambda: lambda x: F.leaky_relu(x, 0.1)],
    "elu": [lambda: nn.ELU(0.7), lambda: lambda x: F.elu(x, 1.3)],
    "celu": [lambda: nn.CELU(0.6), lambda: lambda x: F.celu(x, 1.5)],
    "selu": [nn.SELU, lambda: F.selu],
    "silu": [nn.SiLU, lambda: F.silu],
    "gelu": [nn.GELU, lambda: nn.GELU("tanh"), lambda: lambda x: F.gelu(x, approximate="tanh")],
    "hardswish": [nn.Hardswish, lambda: F.hardswish],
    "mish": [nn.Mish, lambda: F.mish],
    "tanh": [nn.Tanh, lambda: torch.tanh, lambda: F.tanh, lambda: lambda x: x.tanh()],
    "softsign": [nn.Softsign, lambda: F.softsign],
    "tanhshrink": [nn.Tanhshrink, lambda: F.tanhshrink],
    "hardshrink": [lambda: nn.Hardshrink(0.3), lambda: lambda x: F.hardshrink(x, 0.4)],
    "softshrink": [lambda: nn.Softshrink(0.3), lambda: F.softshrink],
    "prelu": [nn.PReLU, lambda: nn.PReLU(C)],
    "sigmoid": [nn.Sigmoid, lambda: torch.sigmoid, lambda: F.sigmoid, lambda: lambda x: x.sigmoid()],
    "hardsigmoid": [nn.Hardsigmoid, lambda: F.hardsigmoid],
    "softplus": [nn.Softplus, lambda: nn.Softplus(2.0, 3.0), lambda: lambda x: F.softplus(x, beta=0.5)],
}
for name, makers in ACTS.items():
    for mk in makers:
        case(name, mk, act=False)
for mk in (lambda: nn.Softmax(1), lambda: lambda x: F.softmax(x, 1), lambda: lambda x: torch.softmax(x, -1),
           lambda: lambda x: x.softmax(1)):
    case("softmax", mk)

for r in (1, 2, 3):
    nd = f"{r}d"
    case("max_pool", lambda nd=nd: getattr(nn, f"MaxPool{nd}")(2), r)
    case("max_pool", lambda nd=nd: lambda x: getattr(F, f"max_pool{nd}")(x, 2), r)
    case("avg_pool", lambda nd=nd: getattr(nn, f"AvgPool{nd}")(2), r)
    case("avg_pool", lambda nd=nd: lambda x: getattr(F, f"avg_pool{nd}")(x, 2), r)
    for kind in ("avg", "max"):
        mod, fn = getattr(nn, f"Adaptive{kind.title()}Pool{nd}"), getattr(F, f"adaptive_{kind}_pool{nd}")
        case(f"adaptive_{kind}_pool", lambda mod=mod: mod(2), r)
        case(f"adaptive_{kind}_pool", lambda fn=fn: lambda x: fn(x, 1), r)
    if hasattr(nn, f"LPPool{nd}"):
        case("lp_pool", lambda nd=nd: getattr(nn, f"LPPool{nd}")(2, 2), r)
    if hasattr(F, f"lp_pool{nd}"):
        case("lp_pool", lambda nd=nd: lambda x: getattr(F, f"lp_pool{nd}")(x, 1, 2), r)
    case("dropout", lambda nd=nd: getattr(nn, f"Dropout{nd}")(0.3), r)
    case("dropout", lambda nd=nd: lambda x: getattr(F, f"dropout{nd}")(x, 0.3, training=False), r)
    if hasattr(nn, f"ZeroPad{nd}"):
        case("zero_pad", lambda nd=nd: getattr(nn, f"ZeroPad{nd}")(1), r)
    case("reflection_pad", lambda nd=nd: getattr(nn, f"ReflectionPad{nd}")(1), r)
    case("replication_pad", lambda nd=nd: getattr(nn, f"ReplicationPad{nd}")(1), r)
    case("pad", lambda nd=nd: getattr(nn, f"ConstantPad{nd}")(1, 0.5), r)
case("max_pool", lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True))
case("avg_pool", lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False))
case("lp_pool", lambda: nn.LPPool2d(3.0, 2))
case("dropout", lambda: nn.Dropout(0.3))
case("dropout", lambda: lambda x: F.dropout(x, 0.3, False))
case("stochastic_depth", lambda: _tv().ops.StochasticDepth(0.3, "row"))
case("identity", nn.Identity)
case("identity", lambda: lambda x: x.contiguous())
case("identity", lambda: lambda x: x.clone())
case("upsample", lambda: nn.Upsample(scale_factor=2))
case("upsample", lambda: nn.Upsample(scale_factor=2, mode="bilinear"))
case("upsample", lambda: nn.Upsample(scale_factor=2, mode="linear"), 1)
case("upsample", lambda: nn.UpsamplingNearest2d(scale_factor=2))
case("upsample", lambda: nn.UpsamplingBilinear2d(scale_factor=2))
case("upsample", lambda: lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
case("upsample", lambda: lambda x: F.upsample(x, scale_factor=2))
case("upsample", lambda: lambda x: F.upsample_nearest(x, scale_factor=2))
case("upsample", lambda: lambda x: F.upsample_bilinear(x, scale_factor=2))
case("zero_pad", lambda: nn.ZeroPad2d((1, 0, 2, 1)))

case("flatten", nn.Flatten)
case("flatten", lambda: lambda x: torch.flatten(x, 1))
case("flatten", lambda: lambda x: x.flatten(1))
case("reshape", lambda: lambda x: torch.reshape(x, (-1, C * 64)))
case("reshape", lambda: lambda x: x.reshape(-1, C, 64), site=False)  # not a flatten from dim 1
case("reshape", lambda: lambda x: x.view(-1, C * 64))
case("cat", lambda: lambda x: torch.cat([x, x * 0.5], 1))
case("cat", lambda: lambda x: torch.concat((x, x), dim=1))
case("split", lambda: lambda x: torch.split(x, 4, 1)[1])
case("split", lambda: lambda x: torch.chunk(x, 2, 1)[0])
case("split", lambda: lambda x: x.split(4, dim=1)[0])
case("split", lambda: lambda x: x.chunk(2, 1)[1])
case("getitem", lambda: lambda x: x[:, 2:6])
case("pixel_shuffle", lambda: nn.PixelShuffle(2))
case("pixel_shuffle", lambda: lambda x: F.pixel_shuffle(x, 2))
case("pixel_unshuffle", lambda: nn.PixelUnshuffle(2))
case("pixel_unshuffle", lambda: lambda x: F.pixel_unshuffle(x, 2))
case("mul", lambda: lambda x: x * 0.5)
case("mul", lambda: lambda x: torch.mul(x, 2.0))
case("mul", lambda: lambda x: x.mul(1.5))
case("div", lambda: lambda x: x / 2.0)
case("div", lambda: lambda x: torch.div(x, 4.0))
case("div", lambda: lambda x: x.div(2.0))
case("mean", lambda: lambda x: x.mean((2, 3)))
case("mean", lambda: lambda x: torch.mean(x, dim=(2, 3), keepdim=True))
case("sum", lambda: lambda x: torch.sum(x, (2, 3)))
case("sum", lambda: lambda x: x.sum(dim=3, keepdim=True))
case("amax", lambda: lambda x: torch.amax(x, (2, 3)))
case("amax", lambda: lambda x: x.amax(dim=(2, 3), keepdim=True))
case("add", lambda: lambda x: x + 1.0)
case("add", lambda: lambda x: torch.add(x, x))
case("add", lambda: lambda x: x.add(0.5))
case("sub", lambda: lambda x: x - 0.5)
case("sub", lambda: lambda x: 1.0 - x)
case("sub", lambda: lambda x: torch.sub(x, 1.0))
case("sub", lambda: lambda x: x.sub(0.25))
case("permute", lambda: lambda x: torch.permute(x, (0, 1, 3, 2)))
case("permute", lambda: lambda x: x.permute(0, 1, 3, 2))
case("permute", lambda: lambda x: x.permute([0, 1, 3, 2]))
case("transpose", lambda: lambda x: torch.transpose(x, 2, 3))
case("transpose", lambda: lambda x: x.transpose(-1, -2))
case("pad", lambda: lambda x: F.pad(x, (1, 1)))
case("pad", lambda: lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"))
case("pad", lambda: lambda x: F.pad(x, (1, 2, 0, 1), "replicate"))
case("pad", lambda: lambda x: F.pad(x, (1, 1), value=0.25))
case("alpha_dropout", lambda: nn.AlphaDropout(0.2))
case("alpha_dropout", lambda: nn.FeatureAlphaDropout(0.2))
case("alpha_dropout", lambda: lambda x: F.alpha_dropout(x, 0.2))
case("alpha_dropout", lambda: lambda x: F.feature_alpha_dropout(x, 0.2, training=False))
case("cast", lambda: lambda x: x.detach())
case("cast", lambda: lambda x: x.float())
case("shape", lambda: lambda x: x.reshape(x.shape[0], -1))
case("size", lambda: lambda x: x.view(x.size(0), -1))
case("dim", lambda: lambda x: x.flatten(x.dim() - 3))
case("dim", lambda: lambda x: x.flatten(x.ndimension() - 3))
case("int_arith", lambda: lambda x: F.avg_pool2d(x, x.size(3) // 4))
case("int_arith", lambda: lambda x: F.max_pool2d(x, x.size(3) % 3))


class Sandwich(nn.Module):
    """conv -> [ReLU] -> op -> conv / linear head sized to the op's output."""

    def __init__(self, make, rank: int, act: bool):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        self.c1 = conv(3, C, 3, padding=1)
        self.act = nn.ReLU() if act else None
        self.op = make()
        with torch.no_grad():
            y = self.body(torch.randn(2, 3, *([_size(rank)] * rank)))
        heads = {2: lambda c: nn.Linear(c, 4), 3: lambda c: nn.Conv1d(c, 4, 1),
                 4: lambda c: nn.Conv2d(c, 4, 1), 5: lambda c: nn.Conv3d(c, 4, 1)}
        self.head = heads[y.dim()](y.shape[1])

    def body(self, x):
        x = self.c1(x)
        if self.act is not None:
            x = self.act(x)
        return self.op(x)

    def forward(self, x):
        return self.head(self.body(x))


def _size(rank: int) -> int:
    return 4 if rank == 3 else 8


def _spellings(rule: OpRule) -> set:
    return {*(t for t in rule.modules if isinstance(t, type)), *rule.functions, *rule.methods} - NOT_RECORDED


def _traced_spellings(model: nn.Module) -> dict[str, set]:
    from prunequant.graph.trace import trace

    gm = trace(model)
    seen: dict[str, set] = {}
    for n in gm.graph.nodes:
        r = rule_of(gm, n)
        if r is None:
            continue
        key = type(gm.get_submodule(n.target)) if n.op == "call_module" else n.target
        seen.setdefault(r.name, set()).add(key)
    return seen


def test_every_rule_discovery_accepts_has_an_emitter():
    accepted = [r.name for r in RULES if r.flow not in REFUSED_FLOWS]
    assert len(accepted) > 40
    assert [r.name for r in RULES if r.flow not in REFUSED_FLOWS and r.emit is None] == []
    # the legacy tables are views of the registry: every op they list has an emitter
    by_key = {}
    for r in RULES:
        for k in (*r.modules, *r.functions, *r.methods):
            by_key[k] = r
    for table in (ACT_MODULES, ACT_FUNCTIONS, ACT_METHODS, PASS_MODULES, PASS_FUNCTIONS, PASS_METHODS):
        for k in table:
            assert by_key[k].emit is not None, k


def test_every_rule_and_spelling_has_a_round_trip_case():
    """The parametrized round trip below covers every registry entry and every spelling of it."""
    seen: dict[str, set] = {}
    for _rule, _, make, rank, act, _ in CASES:
        for k, v in _traced_spellings(Sandwich(make, rank, act)).items():
            seen.setdefault(k, set()).update(v)
    missing = {r.name: sorted(map(str, _spellings(r) - seen.get(r.name, set()))) for r in RULES}
    missing = {k: v for k, v in missing.items() if v}
    assert missing == {}
    # string-named classes (torchvision's, traced through unless kept opaque): see the leaf test
    assert {r.name for r in RULES} - set(seen) <= {"layer_norm2d"}


def _round_trip(rule, make, rank, act, site, fmt="qdq", n=64):
    from gtools import calibrate, set_masks

    from prunequant.export import build_onnx
    from prunequant.graph import instrument, shrink

    torch.manual_seed(0)
    model = Sandwich(make, rank, act).eval()
    shape = (2, 3) + (_size(rank),) * rank
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    gm, plan = instrument(model, prune_stat="a_l1", weight_bits=8, act_bits=8, example_input=x)
    flow = next(r.flow for r in RULES if r.name == rule)
    if flow not in REFUSED_FLOWS and site:
        assert plan.sites, plan.skipped  # discovery follows the channels through the op: pruned
    set_masks(gm)
    calibrate(gm, shape)
    small = shrink(gm).eval()
    xs = torch.randn((n,) + shape[1:], generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = small(xs).numpy()
    if fmt == "qdq":
        proto = build_onnx(small, x, "qdq")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        out = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"input": xs.numpy()})[0]
    else:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx

        out = execute_onnx(ModelWrapper(build_onnx(small, xs, "qonnx")), {"input": xs.numpy()})["output"]
    # as the zoo round trips (tests/export/test_zoo_export.py): within one 8-bit output step for
    # >= 95 % of the samples, equal up to float noise for most
    assert out.shape == ref.shape
    worst = np.abs(out - ref).reshape(len(ref), -1).max(axis=1)
    assert np.mean(worst <= (ref.max() - ref.min()) / 255) >= 0.95, np.sort(worst)[-5:]
    assert np.median(worst) < 1e-4, np.median(worst)


@pytest.mark.parametrize("rule,make,rank,act,site", [pytest.param(c[0], *c[2:], id=c[1]) for c in CASES])
def test_op_round_trip_w8a8_pruned_qdq(rule, make, rank, act, site):
    _round_trip(rule, make, rank, act, site)


#: Rules whose QONNX form (opset 13) differs from the QDQ one (opset 21) or uses ops new to the export.
QONNX_RULES = {"layer_norm", "mean", "sum", "amax", "celu", "selu", "softsign", "hardshrink", "softshrink",
               "tanhshrink", "mish", "softplus", "lp_pool"}


@pytest.mark.parametrize("rule,make,rank,act,site",
                         [pytest.param(c[0], *c[2:], id=c[1]) for c in CASES if c[0] in QONNX_RULES])
def test_op_round_trip_w8a8_pruned_qonnx(rule, make, rank, act, site):
    pytest.importorskip("qonnx")
    _round_trip(rule, make, rank, act, site, fmt="qonnx", n=8)


class _Leaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("torchvision") or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("opset", [13, 21])
def test_torchvision_modules_kept_opaque_are_emitted(opset):
    """LayerNorm2d, Permute and StochasticDepth as call_module nodes (float graph, both opsets)."""
    from prunequant.export._fx2onnx import translate
    from prunequant.export.onnx_export import _FloatStyle

    tv = _tv()
    from torchvision.models.convnext import LayerNorm2d

    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), LayerNorm2d(C), tv.ops.StochasticDepth(0.5, "row"),
                          tv.ops.misc.Permute([0, 2, 3, 1]), nn.Linear(C, 5)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    gm = fx.GraphModule(model, _Leaves().trace(model))
    assert {rule_of(gm, n).name for n in gm.graph.nodes if n.op == "call_module"} >= {
        "layer_norm2d", "stochastic_depth", "permute"}
    style = _FloatStyle()
    style.opset = opset
    x = torch.randn(4, 3, 6, 6)
    proto, _ = translate(gm, x, style, dynamic_batch=True, value_info=False, graph_name="t", doc="")
    ops = {n.op_type for n in proto.graph.node}
    assert ("LayerNormalization" in ops) == (opset >= 17)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=0, atol=1e-5)


def test_unknown_op_is_refused_naming_op_and_module():
    from prunequant.export import ExportError
    from prunequant.graph.ops import is_act, is_pass

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.inner = nn.Sequential(nn.Conv2d(4, 4, 1))

        def forward(self, x):
            return torch.cumsum(self.inner(self.c(x)), 1)

    from prunequant.export.onnx_export import build_float_onnx

    gm = fx.symbolic_trace(Odd())
    n = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert rule_of(gm, n) is None and not is_act(gm, n) and not is_pass(gm, n)
    with pytest.raises(ExportError, match="cumsum.*not supported.*selu"):
        build_float_onnx(Odd(), torch.randn(1, 3, 8, 8))
