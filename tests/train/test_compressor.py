"""The Compressor driven from a plain training loop: orderings (METHOD section 4), importance measures,
per-layer targets, exclusion, quantizer statistics over training, masked channels through quantizers,
resuming from a state dict, and configuration errors.

(The layerwise / one-shot / stepwise windows themselves are checked in tests/prune/test_schedule.py.)
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunequant import Compressor, RecipeError, ScheduleError
from prunequant.graph.instrument import raw_weight, weight_quantizer
from prunequant.models import build_model
from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer
from prunequant.recipe import QuantConfig

IMG = 16


def _model(seed: int = 0, name: str = "lenet5", width: float = 0.5) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes=10, in_channels=1, image_size=IMG, width=width)


def _data(n: int, seed: int = 1, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, IMG, IMG, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def _example() -> torch.Tensor:
    return torch.randn(2, 1, IMG, IMG, generator=torch.Generator().manual_seed(123))


def _train(comp: Compressor, batches, opt=None, before_step=None, lr: float = 0.05):
    if opt is None:
        opt = torch.optim.SGD(comp.model.parameters(), lr=lr, momentum=0.9)
    comp.model.train()
    for x, y in batches:
        loss = F.cross_entropy(comp.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if before_step is not None:
            before_step(comp)
        comp.step()
    return opt


def _k(s: float, c: int) -> int:
    return min(math.floor(Fraction(str(s)) * c), c - 1)


def _masks(comp: Compressor):
    return [comp.model.get_submodule(s.mask) for s in comp.plan.sites]


def _wqs(comp: Compressor) -> list[WeightQuantizer]:
    return [m for m in comp.model.modules() if isinstance(m, WeightQuantizer)]


def _aqs(comp: Compressor) -> list[ActQuantizer]:
    return [m for m in comp.model.modules() if isinstance(m, ActQuantizer)]


PRUNE = {"unit": "steps", "start": 2, "interval": 3, "refresh": 1, "sparsity": 0.5}
QUANT = {"unit": "steps", "weight_bits": 4, "act_bits": 4, "weight_delay": 3, "act_delay": 1,
         "first_last_bits": None}


# ----------------------------------------------------------------------------------------- orderings
def _record_ordering(ordering: str, quant: dict | None = None, extra: int = 4):
    comp = Compressor(_model(), {"prune": PRUNE, "quant": quant or QUANT, "ordering": ordering}, _example())
    masks, wqs, aqs = _masks(comp), _wqs(comp), _aqs(comp)
    assert len(wqs) == len(comp.plan.layers) == 5 and len(aqs) == 5  # every conv / linear layer
    log = []

    def pre(mod, args):
        log.append({
            "step": comp.step_count,
            "wq": [bool(w.enabled) for w in wqs],
            "aq": [bool(a.enabled) for a in aqs],
            "collecting": [bool(m.collecting) for m in masks],
            "frozen": [bool(m.frozen) for m in masks],
            "zeros": [int((m.mask == 0).sum()) for m in masks],
        })

    comp.model.register_forward_pre_hook(pre)
    _train(comp, _data(comp.total_steps_hint + extra))
    assert [r["step"] for r in log] == list(range(len(log)))
    return comp, log


def test_prune_then_quantize_enables_quantizers_after_last_freeze():
    comp, log = _record_ordering("prune_then_quantize")
    tl = comp.timeline
    L = len(comp.plan.sites)
    assert tl.prune_begin == PRUNE["start"]
    assert tl.prune_end == PRUNE["start"] + L * (PRUNE["interval"] + 1) - 1
    assert tl.quant_begin == tl.prune_end + 1
    assert tl.weight_quant_at == tl.quant_begin + QUANT["weight_delay"]
    assert tl.act_quant_at == tl.quant_begin + QUANT["act_delay"]
    assert comp.total_steps_hint == max(tl.weight_quant_at, tl.act_quant_at)
    for r in log:
        t = r["step"]
        assert all(w == (t >= tl.weight_quant_at) for w in r["wq"]), t
        assert all(a == (t >= tl.act_quant_at) for a in r["aq"]), t
        if any(r["wq"]) or any(r["aq"]):
            assert all(r["frozen"]) and not any(r["collecting"]), t
    assert any(all(r["wq"]) and all(r["aq"]) for r in log)  # quantization did happen


def test_quantize_then_prune_starts_pruning_after_quantizers_are_live():
    comp, log = _record_ordering("quantize_then_prune")
    tl = comp.timeline
    assert tl.quant_begin == 0
    assert tl.weight_quant_at == QUANT["weight_delay"] and tl.act_quant_at == QUANT["act_delay"]
    assert tl.prune_begin > max(tl.weight_quant_at, tl.act_quant_at)
    assert tl.prune_begin == max(QUANT["weight_delay"], QUANT["act_delay"]) + 1 + PRUNE["start"]
    for r in log:
        t = r["step"]
        assert all(w == (t >= tl.weight_quant_at) for w in r["wq"]), t
        assert all(a == (t >= tl.act_quant_at) for a in r["aq"]), t
        if any(r["collecting"]) or any(r["frozen"]) or any(r["zeros"]):
            assert all(r["wq"]) and all(r["aq"]), t
    assert log[-1]["frozen"] == [True] * len(comp.plan.sites)
    first_collect = min(r["step"] for r in log if any(r["collecting"]))
    assert first_collect == tl.prune_begin


@pytest.mark.parametrize("delays", [(3, 1), (0, 0)])
def test_joint_starts_both_from_the_beginning(delays):
    """Joint: quantizer delays count from step 0 and pruning starts at S. With both delays 0 the
    quantizers are live from the very first forward (this used to crash in the constructor)."""
    wd, ad = delays
    comp, log = _record_ordering("joint", {**QUANT, "weight_delay": wd, "act_delay": ad})
    tl = comp.timeline
    assert (tl.quant_begin, tl.weight_quant_at, tl.act_quant_at) == (0, wd, ad)
    assert tl.prune_begin == PRUNE["start"]
    for r in log:
        t = r["step"]
        assert all(w == (t >= wd) for w in r["wq"]) and all(a == (t >= ad) for a in r["aq"]), t
    assert log[0]["wq"] == [True] * 5 or wd > 0
    assert log[0]["aq"] == [True] * 5 or ad > 0
    assert min(r["step"] for r in log if any(r["collecting"])) == PRUNE["start"]
    # Pruning overlaps quantization: a mask collects while quantizers are on.
    assert any(any(r["collecting"]) and all(r["wq"]) and all(r["aq"]) for r in log)


def test_quant_only_recipe_with_default_delays_in_epochs():
    """act_delay 0.05 epoch rounds to step 0 with few steps per epoch: must construct and run."""
    comp = Compressor(_model(), {"prune": None, "quant": {"weight_bits": 8, "act_bits": 8}}, _example(),
                      steps_per_epoch=4)
    default = QuantConfig()
    assert comp.timeline.act_quant_at == round(default.act_delay * 4) == 0
    assert comp.timeline.weight_quant_at == round(default.weight_delay * 4) > 0
    assert comp.plan.sites == []
    assert all(bool(a.enabled) for a in _aqs(comp))
    _train(comp, _data(3))
    assert all(bool(w.enabled) for w in _wqs(comp))


# ------------------------------------------------------------------------- quantizer statistics in use
def test_quantizer_statistics_accumulate_over_steps_since_their_delay():
    wd, ad = 2, 1
    comp = Compressor(_model(), {"prune": None, "quant": {**QUANT, "weight_delay": wd, "act_delay": ad}},
                      _example())
    names = sorted(n for n in comp.plan.layers)
    observed: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def grab(c: Compressor):
        # comp.step() about to run makes step_count+1; weights are observed from step wd on.
        if c.step_count + 1 >= wd:
            for n in names:
                observed[n].append(raw_weight(c.model.get_submodule(n)).detach().double().numpy().copy())

    aq_inputs: dict[int, list[tuple[float, float]]] = {id(a): [] for a in _aqs(comp)}

    def aq_hook(mod, args):
        if mod.training and bool(mod.enabled):
            aq_inputs[id(mod)].append((float(args[0].detach().min()), float(args[0].detach().max())))

    for a in _aqs(comp):
        a.register_forward_pre_hook(aq_hook)
    n_steps = 7
    _train(comp, _data(n_steps), before_step=grab)
    for n in names:
        wq = weight_quantizer(comp.model.get_submodule(n))
        obs = observed[n]
        assert len(obs) == n_steps - wd + 1 == int(wq.stat_count)
        if wq.per_channel:
            stats = [np.abs(w.reshape(w.shape[0], -1)).max(axis=1) for w in obs]
        else:
            stats = [np.abs(w).max(keepdims=True).reshape(1) for w in obs]
        expected = np.mean(stats, axis=0) / 2 ** (QUANT["weight_bits"] - 1)
        np.testing.assert_allclose(wq.scale().double().numpy(), expected, rtol=1e-6)
        assert wq.per_channel == (comp.plan.layers[n].kind != "linear")
    for a in _aqs(comp):
        seen = aq_inputs[id(a)]
        assert len(seen) == n_steps - ad == int(a.stat_count)  # one training forward per step from ad on
        mins, maxs = np.array(seen).T
        assert a.bounds()[0] == pytest.approx(min(mins.mean(), 0.0), rel=1e-5, abs=1e-7)
        assert a.bounds()[1] == pytest.approx(max(maxs.mean(), 0.0), rel=1e-5, abs=1e-7)


def test_masked_channels_stay_zero_through_quantizers_and_training():
    """After pruning, the quantized input of every consumer is exactly zero in pruned channels."""
    quant = {**QUANT, "weight_delay": 0, "act_delay": 0}
    recipe = {"prune": PRUNE, "quant": quant, "ordering": "prune_then_quantize"}
    comp = Compressor(_model(), recipe, _example())
    checked = {"n": 0, "max": 0.0}
    for name, info in comp.plan.layers.items():
        if info.input_site is None:
            continue
        mask = comp.model.get_submodule(comp.plan.site(info.input_site).mask)
        aq = comp.model.get_submodule(info.act_quant)
        layer = comp.model.get_submodule(name)

        def hook(mod, args, out, mask=mask, layer=layer):
            dead = mask.mask == 0
            if not dead.any() or not bool(mod.enabled):
                return
            o = out.detach()
            if isinstance(layer, nn.Linear) and o.shape[1] != mask.channels:  # after flatten: C*H*W
                o = o.reshape(o.shape[0], mask.channels, -1)
            checked["n"] += 1
            checked["max"] = max(checked["max"], float(o[:, dead].abs().max()))

        aq.register_forward_hook(hook)
    _train(comp, _data(comp.total_steps_hint + 6))
    assert checked["n"] >= 3 * 5
    assert checked["max"] == 0.0
    # The dead channels of the producers are also zero in eval (BN with running statistics).
    out = {}
    for s in comp.plan.sites:
        comp.model.get_submodule(s.mask).register_forward_hook(
            lambda mod, a, o, name=s.name: out.__setitem__(name, (o.detach(), mod.mask.clone())))
    comp.model.eval()
    comp.model(_data(1, seed=9)[0][0])
    for name, (o, m) in out.items():
        assert float(o[:, m == 0].abs().max()) == 0.0, name


# ---------------------------------------------------------------------- targets, exclusion, importance
def test_per_layer_sparsity_overrides_and_exclude():
    prune = {**PRUNE, "per_layer": {"fc*": 0.25, "conv2": 0.0, "fc1": 0.75}, "exclude": ["fc2"]}
    comp = Compressor(_model(), {"prune": prune, "quant": None}, _example())
    names = [s.name for s in comp.plan.sites]
    assert names == ["conv1", "conv2", "fc1"]
    assert comp.plan.skipped.get("fc2") == "excluded by pattern"
    _train(comp, _data(comp.total_steps_hint + 2))
    want = {"conv1": 0.5, "conv2": 0.0, "fc1": 0.75}  # later patterns win: fc1 -> 0.75, not 0.25
    rep = {r["name"]: r for r in comp.sparsity_report()}
    for s in comp.plan.sites:
        m = comp.model.get_submodule(s.mask)
        assert rep[s.name]["target_sparsity"] == want[s.name]
        assert s.channels - m.kept == _k(want[s.name], s.channels), s.name
        assert rep[s.name]["kept"] == m.kept and rep[s.name]["frozen"]
    # The excluded layer has no mask: fc2's output channels are all alive.
    assert not any("fc2" in n for n, _ in comp.model.named_modules() if n.startswith("pq_masks"))


def test_w_l1_masks_prune_lowest_mean_abs_filter_weights_at_freeze_time():
    comp = Compressor(_model(), {"prune": {**PRUNE, "importance": "w_l1"}, "quant": None}, _example())
    sites = comp.plan.sites
    S, I = PRUNE["start"], PRUNE["interval"]
    freeze_at = {i: S + i * (I + 1) + I for i in range(len(sites))}
    expected_scores: dict[int, np.ndarray] = {}

    def grab(c: Compressor):
        t = c.step_count + 1
        for i, s in enumerate(sites):
            if freeze_at[i] == t:
                w = raw_weight(c.model.get_submodule(s.producer)).detach().double().numpy()
                expected_scores[i] = np.abs(w.reshape(w.shape[0], -1)).mean(axis=1)

    _train(comp, _data(comp.total_steps_hint + 2), before_step=grab)
    for i, s in enumerate(sites):
        m = comp.model.get_submodule(s.mask)
        assert float(m.stat_count) == 0  # weight importance gathers no activation statistics
        k = _k(PRUNE["sparsity"], s.channels)
        pruned = m.mask.numpy() == 0
        assert pruned.sum() == k and bool(m.frozen)
        sc = expected_scores[i]
        assert sc[pruned].max() <= sc[~pruned].min() + 1e-12, s.name


def _random_run(seed: int, data_seed: int, model_seed: int):
    comp = Compressor(_model(model_seed), {"prune": {**PRUNE, "importance": "random", "seed": seed},
                                           "quant": None}, _example())
    _train(comp, _data(comp.total_steps_hint + 1, seed=data_seed))
    return comp, [m.mask.clone() for m in _masks(comp)]


def test_random_importance_reproducible_by_seed_only():
    comp, a = _random_run(seed=7, data_seed=1, model_seed=0)
    _, b = _random_run(seed=7, data_seed=2, model_seed=3)  # other data and init: same masks
    _, c = _random_run(seed=8, data_seed=1, model_seed=0)
    for s, m in zip(comp.plan.sites, a):
        assert int((m == 0).sum()) == _k(PRUNE["sparsity"], s.channels)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    big = [i for i, s in enumerate(comp.plan.sites) if s.channels >= 40]
    assert big and any(not torch.equal(a[i], c[i]) for i in big)


def test_a_l0_importance_masks():
    comp = Compressor(_model(), {"prune": {**PRUNE, "importance": "a_l0"}, "quant": None}, _example())
    stats: dict[int, list[np.ndarray]] = {i: [] for i in range(len(comp.plan.sites))}
    for i, m in enumerate(_masks(comp)):
        def hook(mod, args, i=i):
            if mod.training and bool(mod.collecting):
                x = args[0].detach()
                stats[i].append((np.moveaxis(x.numpy(), 1, -1).reshape(-1, x.shape[1]) != 0).mean(axis=0))
        m.register_forward_pre_hook(hook)
    _train(comp, _data(comp.total_steps_hint + 1))
    for i, (s, m) in enumerate(zip(comp.plan.sites, _masks(comp))):
        mu = np.mean(stats[i], axis=0)
        np.testing.assert_allclose(m.mean_stat().numpy(), mu, rtol=1e-6)
        pruned = m.mask.numpy() == 0
        assert pruned.sum() == _k(PRUNE["sparsity"], s.channels)
        assert mu[pruned].max() <= mu[~pruned].min() + 1e-12


# ---------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("ordering", ["prune_then_quantize", "joint"])
def test_resume_from_state_dict_matches_uninterrupted_run(ordering):
    recipe = {"prune": PRUNE, "quant": {**QUANT, "weight_delay": 1, "act_delay": 2}, "ordering": ordering}
    ref = Compressor(_model(0), recipe, _example())
    n = ref.total_steps_hint + 4
    data = _data(n)
    _train(ref, data)

    cut = PRUNE["start"] + (PRUNE["interval"] + 1) + 2  # in the middle of the second layer's window
    first = Compressor(_model(0), recipe, _example())
    opt = _train(first, data[:cut])
    m1 = _masks(first)[1]
    assert bool(m1.collecting) and float(m1.stat_count) == 2  # really interrupted mid-window
    state = {k: v.clone() for k, v in first.state_dict().items()}
    opt_state = opt.state_dict()
    assert int(state["pq_step"]) == cut

    resumed = Compressor(_model(42), recipe, _example())  # other init: everything must come from the state
    resumed.load_state_dict(state)
    assert resumed.step_count == cut
    opt2 = torch.optim.SGD(resumed.model.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(opt_state)
    _train(resumed, data[cut:], opt=opt2)

    for a, b in zip(_masks(ref), _masks(resumed)):
        assert torch.equal(a.mask, b.mask)
        assert bool(a.frozen) and bool(b.frozen)
    sd_ref, sd_res = ref.state_dict(), resumed.state_dict()
    assert sd_ref.keys() == sd_res.keys()
    for k in sd_ref:
        torch.testing.assert_close(sd_res[k], sd_ref[k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------- finalize & co
def test_finalize_freezes_everything():
    comp = Compressor(_model(), {"prune": PRUNE, "quant": {**QUANT, "weight_delay": 0, "act_delay": 0},
                                 "ordering": "joint"}, _example())
    _train(comp, _data(PRUNE["start"] + 2))  # stop while the first layer still collects
    assert not comp.pruning_done
    with pytest.raises(ScheduleError,
                       match=r"finalize\(\) at step 4.*4 of 4 layers not pruned.*allow_incomplete"):
        comp.finalize()
    assert not any(bool(m.frozen) for m in _masks(comp))  # the refusal changed nothing
    model = comp.finalize(shrink=False, allow_incomplete=True)  # the masked model, frozen in place
    assert model is comp.model and not model.training
    assert not comp.pruning_done  # frozen early is not pruned as scheduled
    assert all(bool(m.frozen) and not bool(m.collecting) for m in _masks(comp))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # even in training mode nothing moves any more
    model(_data(1, seed=5)[0][0])
    for k, v in model.state_dict().items():
        if "running_" in k or "num_batches_tracked" in k:
            continue  # BatchNorm is the user's business
        assert torch.equal(v, before[k]), k


def test_configuration_errors():
    with pytest.raises(RecipeError, match="prune.start"):
        Compressor(_model(), {"prune": {"unit": "epochs"}, "quant": None}, _example())
    with pytest.raises(RecipeError, match="steps_per_epoch"):
        Compressor(_model(), {"prune": None, "quant": {"unit": "steps"}}, _example(), steps_per_epoch=0)
    with pytest.raises(RecipeError, match=r"prune.interval.*whole number"):
        Compressor(_model(), {"prune": {**PRUNE, "interval": 2.5}, "quant": None}, _example())
    with pytest.raises(RecipeError, match="prune.sparsity"):
        Compressor(_model(), {"prune": {**PRUNE, "sparsity": 1.5}, "quant": None}, _example())
    lin = nn.Sequential(nn.Linear(4, 3))  # nothing prunable
    with pytest.raises(RecipeError, match="no prunable channels"):
        Compressor(lin, {"prune": PRUNE, "quant": None}, torch.randn(2, 4))


def test_compressor_instruments_in_place_and_shares_parameters():
    """Documented behaviour: the user's layers get the weight quantizers and ``comp.model`` shares the
    parameters, so an optimizer built on ``model.parameters()`` before compression keeps working."""
    model = _model()
    x = _example()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    comp = Compressor(model, {"prune": None, "quant": {**QUANT, "weight_bits": 2, "weight_delay": 0}}, x)
    comp.step()
    assert all(bool(w.enabled) for w in _wqs(comp))
    assert {id(p) for p in comp.model.parameters()} == {id(p) for p in model.parameters()}
    before = [p.detach().clone() for p in comp.model.parameters()]
    comp.model.train()
    comp.model(x).square().mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, comp.model.parameters()))


def test_per_layer_bits_inherit_unset_fields_and_null_means_float():
    """``{act_bits: 8}`` keeps the global weight bits; an explicit ``weight_bits: null`` is float."""
    model = _model()
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    first, last = names[0], names[-1]
    recipe = {"prune": None, "quant": {**QUANT, "weight_bits": 4, "act_bits": 4, "weight_delay": 0,
                                        "per_layer": {first: {"act_bits": 8}, last: {"weight_bits": None}}}}
    comp = Compressor(model, recipe, _example())
    info = comp.plan.layers
    assert info[first].weight_bits == 4 and info[first].act_bits == 8
    assert info[last].weight_bits is None and info[last].act_bits == 4
    assert comp._wq.keys() == set(names) - {last}


def test_range_options_reach_every_quantizer_and_survive_save_and_packed(tmp_path):
    from prunequant.export import load_packed, save_packed
    from prunequant.graph import load_pruned, save_pruned
    from prunequant.quant.quantizers import batch_percentiles

    quant = {**QUANT, "act_percentile": 99.0, "weight_clip": "mse"}
    comp = Compressor(_model(), {"prune": PRUNE, "quant": quant, "ordering": "joint"}, _example())
    aqs = _aqs(comp)
    assert aqs and all(a.percentile == 99.0 for a in aqs)
    assert _wqs(comp) and all(w.clip == "mse" for w in _wqs(comp))
    seen: dict[int, list[float]] = {id(a): [] for a in aqs}

    def pre(mod, args):  # the statistic each enabled quantizer should add at this forward
        if mod.training and bool(mod.enabled):
            seen[id(mod)].append(float(batch_percentiles(args[0].detach(), 99.0)[1]))

    hooks = [a.register_forward_pre_hook(pre) for a in aqs]
    _train(comp, _data(comp.total_steps_hint + 2))
    for h in hooks:
        h.remove()
    for a in aqs:
        assert seen[id(a)] and float(a.max_sum / a.stat_count) == pytest.approx(np.mean(seen[id(a)]))
    small = comp.finalize()
    x = _data(1, seed=9)[0][0]
    with torch.no_grad():
        want = small(x)
    save_pruned(small, tmp_path / "m")
    back = load_pruned(_model(seed=3), tmp_path / "m", _example()).eval()
    assert all(a.percentile == 99.0 for a in _aqs_of(back))
    assert all(w.clip == "mse" for w in back.modules() if isinstance(w, WeightQuantizer))
    path = save_packed(small, tmp_path / "m.pqz", example_input=_example())
    packed = load_packed(path, _model(seed=4)).eval()
    with torch.no_grad():
        assert torch.equal(back(x), want)
        assert torch.equal(packed(x), want)


def _aqs_of(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


# ------------------------------------------------------------------------- silent no-ops, refused
def _bits(comp: Compressor) -> dict[str, tuple]:
    return {n: (i.weight_bits, i.act_bits) for n, i in comp.plan.layers.items()}


def test_first_last_bits_resolve_to_the_boundary_layers():
    quant = {**QUANT, "first_last_bits": 8}
    comp = Compressor(_model(), {"prune": None, "quant": quant}, _example())
    assert _bits(comp) == {"conv1": (4, 8), "conv2": (4, 4), "fc1": (4, 4), "fc2": (4, 4), "fc3": (8, 8)}
    # an explicit per_layer entry wins over the boundary rule for the layers it matches
    quant["per_layer"] = {"fc3": {"act_bits": 6}, "conv2": {"weight_bits": None}}
    comp = Compressor(_model(), {"prune": None, "quant": quant}, _example())
    assert _bits(comp) == {"conv1": (4, 8), "conv2": (None, 4), "fc1": (4, 4), "fc2": (4, 4), "fc3": (4, 6)}
    # a layer fed by the input and also feeding the output is both: input and weights at 8 bits
    one = nn.Sequential(nn.Flatten(), nn.Linear(IMG * IMG, 10))
    comp = Compressor(one, {"prune": None, "quant": {**QUANT, "first_last_bits": 8}}, _example())
    assert _bits(comp) == {"1": (8, 8)}


@pytest.mark.parametrize(("recipe", "field", "hint"), [
    ({"prune": {**PRUNE, "exclude": ["conv3"]}, "quant": None}, "prune.exclude", "did you mean 'conv1'"),
    ({"prune": {**PRUNE, "per_layer": {"fc9": 0.2}}, "quant": None}, "prune.per_layer", "did you mean"),
    ({"prune": {**PRUNE, "per_layer": {"fc3": 0.2}}, "quant": None}, "prune.per_layer",
     "matches layers whose output channels cannot be pruned"),
    ({"prune": None, "quant": {**QUANT, "per_layer": {"classifier*": {"weight_bits": 8}}}}, "quant.per_layer",
     "they are: conv1, conv2, fc1, fc2, fc3"),
])
def test_patterns_that_match_nothing_are_refused(recipe, field, hint):
    with pytest.raises(RecipeError) as info:
        Compressor(_model(), recipe, _example())
    msg = str(info.value)
    assert f"{field}: pattern" in msg and "matches no" in msg and hint in msg, msg


def test_patterns_that_match_are_accepted():
    comp = Compressor(_model(), {"prune": {**PRUNE, "exclude": ["conv*"], "per_layer": {"fc*": 0.25}},
                                 "quant": {**QUANT, "per_layer": {"fc?": {"act_bits": 8}}}}, _example())
    assert [s.name for s in comp.plan.sites] == ["fc1", "fc2"]


def test_eval_mode_loop_warns_and_refuses_to_choose_masks_from_nothing():
    comp = Compressor(_model(), {"prune": PRUNE, "quant": None}, _example())
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.05)
    comp.model.eval()  # the mistake: evaluation left the model in eval mode
    with pytest.warns(RuntimeWarning, match="eval mode.*masks gather no activation statistics.*model.train"):
        with pytest.raises(ScheduleError, match="conv1.*no activation statistics.*model.train"):
            for x, y in _data(PRUNE["start"] + PRUNE["interval"] + 1):
                loss = F.cross_entropy(comp.model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                comp.step()
    assert bool(_masks(comp)[0].mask.all())  # no mask was chosen from zero statistics


def test_train_mode_loop_does_not_warn():
    import warnings

    comp = Compressor(_model(), {"prune": PRUNE, "quant": QUANT}, _example())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(comp, _data(comp.total_steps_hint + 1))
    assert comp.pruning_done and comp.schedule_done and comp.incomplete() == []
    comp.finalize()


@pytest.mark.parametrize("root_training", [True, False])
def test_construction_keeps_every_module_mode(root_training: bool) -> None:
    """Compressor() runs the model once in eval mode; a frozen BatchNorm of the user's model stays frozen."""
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=16, width=0.25)
    model.train(root_training)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.train(not root_training)
    before = [m.training for m in model.modules()]
    comp = Compressor(model, {"prune": {"sparsity": 0.5, "unit": "steps", "start": 1, "interval": 1,
                                        "refresh": 1}, "quant": None}, torch.randn(2, 3, 16, 16))
    assert [m.training for m in model.modules()] == before
    assert comp.model.training == root_training and bn.training == (not root_training)
