"""QuantPolicy: per-layer bits, quantizer construction, recorded options, and instrument(quant=...)."""

from __future__ import annotations

import fnmatch
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunequant.graph import instrument, weight_quantizer
from prunequant.quant import QuantPolicy
from prunequant.quant.quantizers import MAX_BITS, MIN_BITS, ActQuantizer, WeightQuantizer

NAMES = ["stem", "a", "b", "up", "head", "block.0.conv", "block.1.conv", "block.1.fc"]
PATTERNS = ["*", "a", "b", "?", "stem", "block.*", "block.1.*", "*.conv", "block.[01].conv", "h*", "nope"]
bits_or_float = st.one_of(st.none(), st.integers(MIN_BITS, MAX_BITS))
override = st.dictionaries(st.sampled_from(["weight_bits", "act_bits"]), bits_or_float)
layer_bits = st.one_of(st.none(), st.dictionaries(st.sampled_from(PATTERNS), override, max_size=5))
policies = st.builds(
    QuantPolicy, weight_bits=bits_or_float, act_bits=bits_or_float, power_of_two=st.booleans(),
    layer_bits=layer_bits,
    act_percentile=st.one_of(st.none(), st.sampled_from([99, 99.9, 75.0])),
    weight_clip=st.sampled_from(["max", "mse"]), weight_range=st.sampled_from(["full", "reduced"]),
)


class Net(nn.Module):
    """conv, a shared input (1x1 conv + depthwise conv), transposed conv and linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(14, 4, 2, stride=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.cat([torch.relu(self.a(h)), torch.relu(self.b(h))], dim=1)
        h = torch.relu(self.up(h))
        return self.head(h.mean(dim=(2, 3)))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _reference_bits(p: QuantPolicy, table: dict | None, name: str) -> tuple:
    for pat, o in reversed(list((table or {}).items())):
        if fnmatch.fnmatchcase(name, pat):
            return o.get("weight_bits", p.weight_bits), o.get("act_bits", p.act_bits)
    return p.weight_bits, p.act_bits


@settings(max_examples=200, deadline=None)
@given(wb=bits_or_float, ab=bits_or_float, table=layer_bits, name=st.sampled_from(NAMES))
def test_bits_last_matching_pattern_wins(wb, ab, table, name):
    p = QuantPolicy(weight_bits=wb, act_bits=ab, layer_bits=table)
    assert p.bits(name) == _reference_bits(p, table, name)


def test_bits_unset_field_inherits_and_none_means_float():
    p = QuantPolicy(weight_bits=4, act_bits=4,
                    layer_bits={"*": {"act_bits": 8}, "head": {"weight_bits": None}, "b": {}})
    assert p.bits("stem") == (4, 8)
    assert p.bits("head") == (None, 4)  # the last match wins whole: "*" does not apply to head
    assert p.bits("b") == (4, 4)
    assert QuantPolicy().bits("stem") == (None, None)


@settings(max_examples=100, deadline=None)
@given(p=policies)
def test_options_round_trip(p):
    opts = p.options()
    assert QuantPolicy.from_options(opts) == p
    assert hash(QuantPolicy.from_options(json.loads(json.dumps(opts)))) == hash(p)
    assert QuantPolicy.from_options({"prune_stat": "a_l1", "exclude": [], "groups": True, **opts}) == p
    assert list(opts)[:4] == ["weight_bits", "act_bits", "power_of_two", "layer_bits"]
    assert ("act_percentile" in opts) == (p.act_percentile is not None)
    assert ("weight_clip" in opts) == (p.weight_clip != "max")
    assert ("weight_range" in opts) == (p.weight_range != "full")


def test_options_as_recorded():
    assert QuantPolicy().options() == {"weight_bits": None, "act_bits": None, "power_of_two": False,
                                       "layer_bits": None}
    lb = {"a": {"act_bits": 8}, "*": {"weight_bits": None, "act_bits": 6}}
    opts = QuantPolicy(4, 4, True, lb, 99, "mse", "reduced").options()
    assert json.dumps(opts) == json.dumps({
        "weight_bits": 4, "act_bits": 4, "power_of_two": True, "layer_bits": lb, "act_percentile": 99.0,
        "weight_clip": "mse", "weight_range": "reduced"})


@pytest.mark.parametrize("kw, match", [
    ({"weight_clip": "min"}, "weight_clip"),
    ({"weight_range": "half"}, "weight_range"),
    ({"act_percentile": 100}, "act_percentile"),
    ({"weight_bits": 1}, "weight_bits"),
    ({"act_bits": True}, "act_bits"),
    ({"layer_bits": {"a": {"weight_bit": 4}}}, "unknown fields"),
    ({"layer_bits": {"a": {"act_bits": 40}}}, r"layer_bits\['a'\]\.act_bits"),
    ({"layer_bits": {"a": 4}}, "layer_bits"),
])
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantPolicy(**kw)


def test_quantizers_per_kind():
    p = QuantPolicy(power_of_two=True, weight_clip="mse", weight_range="reduced", act_percentile=99.0)
    conv, convt, lin = nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 4, 2), nn.Linear(4, 5)
    for m, kind, axis, n in [(conv, "conv", 0, 8), (convt, "convT", 1, 4), (lin, "linear", 0, 1)]:
        wq = p.weight_quantizer(m, kind, 6)
        assert isinstance(wq, WeightQuantizer)
        assert (wq.bits, wq.axis, wq.per_channel, wq.stat_sum.numel()) == (6, axis, kind != "linear", n)
        assert (wq.power_of_two, wq.clip, wq.weight_range) == (True, "mse", "reduced")
        assert p.weight_quantizer(m, kind, None) is None
    with pytest.raises(ValueError, match="kind"):
        p.weight_quantizer(conv, "conv3d", 4)
    aq = p.act_quantizer(5)
    assert isinstance(aq, ActQuantizer) and (aq.bits, aq.percentile) == (5, 99.0)


def _describe(gm) -> dict:
    """Everything instrument() decided about quantization, comparable across two models."""
    layers = {}
    for name, info in gm.pq_plan.layers.items():
        wq = weight_quantizer(gm.get_submodule(name))
        layers[name] = (info.weight_bits, info.act_bits, info.act_quant, None if wq is None else
                        (wq.bits, wq.axis, wq.per_channel, wq.power_of_two, wq.clip, wq.weight_range))
    aqs = {n: (m.bits, m.percentile) for n, m in gm.named_modules() if isinstance(m, ActQuantizer)}
    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    return {"options": json.dumps(gm.pq_plan.options), "layers": layers, "aqs": aqs, "state": shapes,
            "code": gm.code}


LEGACY = [
    {},
    {"weight_bits": 8, "act_bits": 8},
    {"weight_bits": 4, "act_bits": 6, "power_of_two": True, "act_percentile": 99.5, "weight_clip": "mse",
     "weight_range": "reduced", "layer_bits": {"*": {"act_bits": 8}, "head": {"weight_bits": None},
                                               "b": {"act_bits": 3}, "up": {"act_bits": None}}},
]


@pytest.mark.parametrize("kw", LEGACY)
def test_instrument_with_policy_equals_legacy_keywords(kw):
    torch.manual_seed(0)
    model = Net()
    gm_legacy, _ = instrument(Net().eval(), example_input=_x(), **kw)
    gm_policy, plan = instrument(model.eval(), example_input=_x(), quant=QuantPolicy(**kw))
    assert _describe(gm_policy) == _describe(gm_legacy)
    assert QuantPolicy.from_options(plan.options) == QuantPolicy(**kw)
    # re-instrumenting from the record (as load_pruned / load_packed do) gives the same model
    gm_again, _ = instrument(Net().eval(), **{**plan.options, "example_input": _x()})
    assert _describe(gm_again) == _describe(gm_policy)


def test_instrument_shared_input_takes_the_widest_bits():
    kw = {"weight_bits": 4, "act_bits": 4, "layer_bits": {"b": {"act_bits": 7}}}
    gm, plan = instrument(Net().eval(), example_input=_x(), quant=QuantPolicy(**kw))
    a, b = plan.layers["a"], plan.layers["b"]
    assert a.act_quant == b.act_quant and a.act_bits == b.act_bits == 7
    assert gm.get_submodule(a.act_quant).bits == 7


def test_instrument_rejects_policy_with_legacy_keywords_and_unknown_keywords():
    with pytest.raises(TypeError, match="not both"):
        instrument(Net(), quant=QuantPolicy(weight_bits=8), weight_bits=8)
    with pytest.raises(TypeError, match="not both"):
        instrument(Net(), quant=QuantPolicy(), layer_bits=None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'wieght_bits'"):
        instrument(Net(), wieght_bits=8)
    with pytest.raises(TypeError, match="unexpected keyword arguments 'x', 'y'"):
        instrument(Net(), quant=QuantPolicy(), x=1, y=2)
    with pytest.raises(TypeError, match="QuantPolicy"):
        instrument(Net(), quant={"weight_bits": 8})
