"""Pruning schedules (METHOD sections 3-4): the pure step arithmetic, and the schedule as it really runs
inside a :class:`Compressor` while a model trains (observed with hooks on every site's ChannelMask).

Step convention: ``comp.step_count`` during a forward is the number of completed ``comp.step()`` calls,
so batch ``t`` (0-based) is seen at step ``t``. Layer i (0-based) must collect over the I batches
``S + i*(I+1) .. S + i*(I+1) + I - 1`` and freeze at ``S + i*(I+1) + I``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from prunequant import Compressor
from prunequant.models import build_model
from prunequant.prune.schedule import ScheduleSpec

# --------------------------------------------------------------------------------- pure schedules
spec_st = st.builds(
    dict,
    n_sites=st.integers(1, 6),
    offset=st.integers(0, 5),
    start=st.integers(0, 5),
    interval=st.integers(1, 7),
    refresh=st.integers(1, 8),
    ramp_steps=st.integers(1, 7),
)


def _events(spec: ScheduleSpec, i: int, s: float) -> dict[int, object]:
    return {t: ev for t in range(spec.end + 5) if (ev := spec.event(i, t, s)) is not None}


@settings(max_examples=60, deadline=None)
@given(kw=spec_st, s=st.sampled_from([0.25, 0.5, 0.75]))
def test_layerwise_events(kw, s):
    spec = ScheduleSpec(kind="layerwise", **kw)
    P, S, I, R, L = kw["offset"], kw["start"], kw["interval"], kw["refresh"], kw["n_sites"]
    prev_freeze = None
    for i in range(L):
        evs = _events(spec, i, s)
        first = P + S + i * (I + 1)
        starts = [t for t, e in evs.items() if e.start]
        freezes = [t for t, e in evs.items() if e.freeze]
        assert starts == [first]
        assert freezes == [first + I]
        assert evs[first + I].update == s  # straight to the target, no ramp
        refreshes = sorted(t for t, e in evs.items() if e.update is not None and not e.freeze)
        assert refreshes == [first + k * R for k in range(1, math.ceil(I / R)) if k * R < I]
        assert all(e.update in (None, s) for e in evs.values())
        assert min(evs) == first and max(evs) == first + I
        if prev_freeze is not None:
            assert first == prev_freeze + 1  # the next layer starts right after this one froze
        prev_freeze = first + I
    assert spec.end == prev_freeze == P + S + L * (I + 1) - 1


@settings(max_examples=60, deadline=None)
@given(kw=spec_st, s=st.sampled_from([0.25, 0.5, 0.75]))
def test_oneshot_events(kw, s):
    spec = ScheduleSpec(kind="oneshot", **kw)
    layerwise_end = ScheduleSpec(kind="layerwise", **kw).end
    for i in range(kw["n_sites"]):
        evs = _events(spec, i, s)
        assert sorted(evs) == [spec.begin, layerwise_end]
        assert evs[spec.begin].start and evs[spec.begin].update is None
        assert evs[layerwise_end].freeze and evs[layerwise_end].update == s


@settings(max_examples=100, deadline=None)
@given(kw=spec_st, s=st.sampled_from([0.25, 0.5, 0.75, 0.9]))
def test_stepwise_events_reach_target_and_freeze(kw, s):
    """Whatever the span, the last stepwise update is at the full target and freezes the mask."""
    spec = ScheduleSpec(kind="stepwise", **kw)
    end = ScheduleSpec(kind="layerwise", **kw).end
    for i in range(kw["n_sites"]):
        evs = _events(spec, i, s)
        assert evs[spec.begin].start
        updates = [(t, e) for t, e in sorted(evs.items()) if e.update is not None]
        assert updates, "no mask update at all"
        t_last, last = updates[-1]
        assert t_last == end and last.freeze and last.update == pytest.approx(s)
        assert [e.freeze for _, e in updates].count(True) == 1
        levels = [e.update for _, e in updates]
        assert levels == sorted(levels)  # gradual: never decreases
        assert all(e.reset_after for _, e in updates[:-1])  # a new statistics window after each point


@pytest.mark.parametrize(("n_sites", "interval", "n"), [(4, 3, 5), (2, 4, 3), (3, 6, 4)])
def test_stepwise_ramp_points_and_levels(n_sites, interval, n):
    span = n_sites * (interval + 1) - 1
    assert span % n == 0  # evenly divisible: points are exact
    spec = ScheduleSpec(kind="stepwise", n_sites=n_sites, offset=1, start=2, interval=interval, refresh=1,
                        ramp_steps=n)
    s = 0.6
    expected = {3 + k * span // n: s * (1 - (1 - k / n) ** 3) for k in range(1, n + 1)}
    evs = _events(spec, 0, s)
    got = {t: e.update for t, e in evs.items() if e.update is not None}
    assert sorted(got) == sorted(expected)
    for t in expected:
        assert got[t] == pytest.approx(expected[t], rel=1e-12)


def test_unknown_schedule_kind():
    spec = ScheduleSpec(kind="nope", n_sites=1, offset=0, start=0, interval=2, refresh=1)
    with pytest.raises(ValueError, match="nope"):
        spec.event(0, 1, 0.5)


# --------------------------------------------------------------------- the schedule while training
@dataclass
class Record:
    """What a run looked like from inside the masks."""

    comp: Compressor
    steps: int
    # per site: list of (step, [(frozen, zeros) of every mask], per-channel stat of this batch)
    collect: list[list[tuple]] = field(default_factory=list)
    # per step: [(collecting, frozen, zeros) of every mask] as seen by that step's forward
    state: list[list[tuple]] = field(default_factory=list)
    masks: list[list[torch.Tensor]] = field(default_factory=list)  # per step: every mask, as used
    masked_outputs: int = 0  # forwards in which some channel of the mask output was masked
    masked_max: float = 0.0  # largest |activation| in a masked channel after the mask, over all forwards


def _zeros(m) -> int:
    return int((m.mask == 0).sum())


def _batch_stat(x: torch.Tensor, kind: str) -> np.ndarray:
    a = np.moveaxis(x.detach().double().numpy(), 1, -1).reshape(-1, x.shape[1])
    return np.abs(a).mean(axis=0) if kind == "a_l1" else (a != 0).mean(axis=0)


def run(model_name: str, prune: dict, steps_after: int = 4, seed: int = 0, width: float = 0.5,
        stat: str = "a_l1") -> Record:
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=10, in_channels=1, image_size=16, width=width)
    recipe = {"prune": {"unit": "steps", "importance": stat, **prune}, "quant": None}
    g = torch.Generator().manual_seed(seed + 1)
    comp = Compressor(model, recipe, torch.randn(2, 1, 16, 16, generator=g))
    masks = [comp.model.get_submodule(s.mask) for s in comp.plan.sites]
    n_steps = comp.total_steps_hint + steps_after
    rec = Record(comp=comp, steps=n_steps, collect=[[] for _ in masks])

    def pre(i):
        def hook(mod, args):
            if mod.training and bool(mod.collecting):
                others = [(bool(m.frozen), _zeros(m)) for m in masks]
                rec.collect[i].append((comp.step_count, others, _batch_stat(args[0], stat)))
        return hook

    def post(mod, args, out):
        dead = mod.mask == 0
        if dead.any():
            rec.masked_outputs += 1
            rec.masked_max = max(rec.masked_max, float(out.detach()[:, dead].abs().max()))

    for i, m in enumerate(masks):
        m.register_forward_pre_hook(pre(i))
        m.register_forward_hook(post)
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.05, momentum=0.9)
    comp.model.train()
    for _ in range(n_steps):
        rec.state.append([(bool(m.collecting), bool(m.frozen), _zeros(m)) for m in masks])
        rec.masks.append([m.mask.clone() for m in masks])
        x = torch.randn(8, 1, 16, 16, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(comp.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.step()
    return rec


def _k(s: float, c: int) -> int:
    """floor(s*C) computed exactly from the decimal value of s, keeping at least one channel."""
    return min(math.floor(Fraction(str(s)) * c), c - 1)


def _assert_lowest_pruned(mask: torch.Tensor, scores: np.ndarray, k: int) -> None:
    pruned = mask.numpy() == 0
    assert pruned.sum() == k
    if 0 < k < len(scores):
        assert scores[pruned].max() <= scores[~pruned].min() + 1e-9, "a kept channel scores lower"


S, I, R, SP = 3, 5, 2, 0.5


@pytest.fixture(scope="module")
def layerwise_run() -> Record:
    return run("resnet20", {"schedule": "layerwise", "start": S, "interval": I, "refresh": R, "sparsity": SP})


def test_layerwise_windows(layerwise_run):
    rec = layerwise_run
    sites = rec.comp.plan.sites
    assert len(sites) >= 3
    L = len(sites)
    assert rec.comp.timeline.prune_begin == S
    assert rec.comp.timeline.prune_end == S + L * (I + 1) - 1
    assert rec.steps > rec.comp.timeline.prune_end + 1  # training went on after the last freeze
    for i in range(L):
        steps = [r[0] for r in rec.collect[i]]
        first = S + i * (I + 1)
        assert steps == list(range(first, first + I)), f"site {i} collected at {steps}"
        # Layer i starts only after layer i-1 froze (and only then).
        if i > 0:
            froze_prev = min(t for t, st_ in enumerate(rec.state) if st_[i - 1][1])
            assert froze_prev == first - 1 == S + (i - 1) * (I + 1) + I
            assert froze_prev < first
        froze = min(t for t, st_ in enumerate(rec.state) if st_[i][1])
        assert froze == first + I
        assert not any(st_[i][0] for st_ in rec.state[froze:])  # never collects again


def test_layerwise_other_masks_while_collecting(layerwise_run):
    rec = layerwise_run
    sites = rec.comp.plan.sites
    ks = [_k(SP, s.channels) for s in sites]
    assert all(k >= 1 for k in ks)
    for i in range(len(sites)):
        first = S + i * (I + 1)
        for step, others, _ in rec.collect[i]:
            for j, (frozen, zeros) in enumerate(others):
                if j < i:
                    assert frozen and zeros == ks[j], (i, j, step)
                elif j > i:
                    assert not frozen and zeros == 0, (i, j, step)
                else:
                    assert not frozen
                    # Own mask: all ones until the first refresh R steps in, then at the target.
                    assert zeros == (0 if step < first + R else ks[i]), (i, step, zeros)


def test_layerwise_final_masks_from_window_statistics(layerwise_run):
    rec = layerwise_run
    for i, site in enumerate(rec.comp.plan.sites):
        m = rec.comp.model.get_submodule(site.mask)
        k = _k(SP, site.channels)
        assert bool(m.frozen) and not bool(m.collecting)
        assert _zeros(m) == k
        stats = np.stack([r[2] for r in rec.collect[i]])
        assert len(stats) == I == int(m.stat_count)
        mu = stats.mean(axis=0)  # equal-weight mean over the window's batches
        np.testing.assert_allclose(m.mean_stat().numpy(), mu, rtol=1e-6, atol=1e-12)
        _assert_lowest_pruned(m.mask, mu, k)
        # The mask stayed as it was at freeze time until the end of training.
        froze = S + i * (I + 1) + I
        assert all(st_[i][2] == k for st_ in rec.state[froze:])
    assert rec.comp.pruning_done


def test_layerwise_masked_channels_stay_exactly_zero(layerwise_run):
    rec = layerwise_run
    assert rec.masked_outputs > 20
    assert rec.masked_max == 0.0


def test_pruning_done_only_after_last_freeze(layerwise_run):
    rec = layerwise_run
    end = rec.comp.timeline.prune_end
    assert not all(st_[-1][1] for st_ in rec.state[:end])
    assert all(all(f for _, f, _ in st_) for st_ in rec.state[end:])


LW = {"start": 2, "interval": 3, "refresh": 1, "sparsity": 0.5}


def test_oneshot_all_layers_same_window_pruned_together():
    rec = run("lenet5", {"schedule": "oneshot", **LW})
    sites = rec.comp.plan.sites
    L = len(sites)
    begin, end = LW["start"], LW["start"] + L * (LW["interval"] + 1) - 1
    assert rec.comp.timeline.prune_end == end
    lw = run("lenet5", {"schedule": "layerwise", **LW}, steps_after=0)
    assert lw.comp.timeline.prune_end == end  # pruned when layerwise pruning would have finished
    ks = [_k(LW["sparsity"], s.channels) for s in sites]
    for i in range(L):
        assert [r[0] for r in rec.collect[i]] == list(range(begin, end))
        for _, others, _ in rec.collect[i]:
            assert others == [(False, 0)] * L  # every layer estimates on the unpruned network
    for t, st_ in enumerate(rec.state):
        zeros = [z for _, _, z in st_]
        assert zeros == ([0] * L if t < end else ks), t
        assert all(f == (t >= end) for _, f, _ in st_)
    for i, site in enumerate(sites):
        mu = np.stack([r[2] for r in rec.collect[i]]).mean(axis=0)
        _assert_lowest_pruned(rec.comp.model.get_submodule(site.mask).mask, mu, ks[i])
    assert rec.masked_max == 0.0


def test_stepwise_follows_cubic_ramp():
    n = 5
    prune = {"schedule": "stepwise", "start": 2, "interval": 3, "refresh": 1, "sparsity": 0.5,
             "stepwise_steps": n}
    rec = run("lenet5", prune)
    sites = rec.comp.plan.sites
    L = len(sites)
    begin = prune["start"]
    span = L * (prune["interval"] + 1) - 1
    assert span % n == 0
    points = [begin + k * span // n for k in range(1, n + 1)]
    assert rec.comp.timeline.prune_end == points[-1]

    def target(k: int, c: int) -> int:
        s_k = Fraction(1, 2) * (1 - (1 - Fraction(k, n)) ** 3)
        return min(math.floor(s_k * c), c - 1)

    for t, st_ in enumerate(rec.state):
        k = sum(p <= t for p in points)  # ramp points already passed
        for (collecting, frozen, zeros), site in zip(st_, sites):
            assert zeros == (0 if k == 0 else target(k, site.channels)), (t, site.name)
            assert frozen == (k == n)
            assert collecting == (begin <= t < points[-1])
    # Each recomputation ranks channels by the statistics gathered since the previous point only.
    bounds = [begin] + points
    for i, site in enumerate(sites):
        by_step = {r[0]: r[2] for r in rec.collect[i]}
        assert sorted(by_step) == list(range(begin, points[-1]))
        for k in range(1, n + 1):
            mu = np.stack([by_step[t] for t in range(bounds[k - 1], bounds[k])]).mean(axis=0)
            _assert_lowest_pruned(rec.masks[bounds[k]][i], mu, target(k, site.channels))
        torch.testing.assert_close(rec.comp.model.get_submodule(site.mask).mask, rec.masks[points[-1]][i])
    assert rec.masked_max == 0.0
