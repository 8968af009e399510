"""The compression loop as a small object a user drives from their own training loop.

```python
comp = prunequant.Compressor(model, recipe, example_input, steps_per_epoch=len(loader))
model = comp.model                      # instrumented; shares the original parameters
opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
for epoch in range(3):
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        comp.step()
small = comp.finalize()
```

All compression state lives in ``comp.model.state_dict()``: the step counter (``pq_step``), masks and
their running statistics, and quantizer statistics. :meth:`Compressor.load_state_dict` resumes.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..errors import ScheduleError
from ..graph.instrument import instrument, raw_weight, weight_quantizer
from ..graph.ops import LAYER_TYPES
from ..graph.trace import trace
from ..prune.mask import ChannelMask, mask_from_scores
from ..prune.schedule import ScheduleSpec
from ..quant.policy import QuantPolicy
from ..quant.quantizers import ActQuantizer
from ..recipe import Recipe, RecipeError, did_you_mean
from ..utils import eval_mode


def boundary_layers(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """``(first, last)``: the conv / linear layers that read the network input with no other layer in
    between, and those whose output reaches a network output with no other layer in between."""
    modules = dict(gm.named_modules())

    def is_layer(n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(modules.get(str(n.target)), LAYER_TYPES)

    first: list[str] = []
    seen: set[fx.Node] = set()
    todo = [n for n in gm.graph.nodes if n.op == "placeholder"]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if is_layer(u):
                first.append(str(u.target))
            else:
                todo.append(u)
    last: list[str] = []
    seen = set()
    todo = [n for n in gm.graph.nodes if n.op == "output"]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if is_layer(a):
                last.append(str(a.target))
            else:
                todo.append(a)
    order = {str(n.target): i for i, n in enumerate(gm.graph.nodes) if is_layer(n)}
    return sorted(set(first), key=order.get), sorted(set(last), key=order.get)


def resolve_layer_bits(model: nn.Module, recipe: Recipe) -> dict[str, dict] | None:
    """The per-layer bit overrides :func:`~prunequant.graph.instrument` gets for ``recipe``.

    ``quant.first_last_bits`` becomes one entry per boundary layer (the first layers' input, the last
    layers' weights and input); ``quant.per_layer`` entries follow, so they win where both match. A
    field left out of a ``per_layer`` entry inherits the global bits, an explicit null means float.
    """
    q = recipe.quant
    if q is None:
        return None
    out: dict[str, dict] = {}
    if q.first_last_bits is not None:
        first, last = boundary_layers(trace(model, recipe.prune.exclude if recipe.prune else ()))
        b = q.first_last_bits
        for name in first:
            out[name] = {"act_bits": b}
        for name in last:
            out[name] = {**out.get(name, {}), "weight_bits": b, "act_bits": b}
    for k, v in q.per_layer.items():
        out.pop(k, None)  # keep the recipe's order: an explicit entry comes after the boundary ones
        out[k] = v.model_dump(exclude_unset=True)
    return out


@dataclass(frozen=True)
class Timeline:
    """Phase boundaries of a compression run, in steps."""

    prune_begin: int | None
    prune_end: int | None  # step at which the last mask froze
    quant_begin: int | None
    weight_quant_at: int | None
    act_quant_at: int | None

    def as_dict(self) -> dict[str, int | None]:
        return dict(self.__dict__)


def _to_steps(value: float, unit: str, steps_per_epoch: int | None, field: str, minimum: int = 0) -> int:
    if unit == "steps":
        if value != int(value):
            raise RecipeError(f"{field}: must be a whole number of steps when unit is 'steps' (got {value})")
        return max(minimum, int(value))
    if steps_per_epoch is None:
        raise RecipeError(f"{field} is given in epochs: pass steps_per_epoch to Compressor "
                          "(or set unit: steps)")
    return max(minimum, int(round(value * steps_per_epoch)))


class Compressor:
    """Greedy layerwise channel pruning + statistics-based uniform QAT, driven by :meth:`step`.

    Args:
        model: the trained dense network. It is instrumented in place: its conv / linear layers get
            the weight quantizers as ``torch.nn.utils.parametrize`` parametrizations, and
            ``comp.model`` (a traced ``GraphModule`` with the masks and activation quantizers) shares
            its parameters, so an optimizer built on ``model.parameters()`` keeps working. Pass a
            ``copy.deepcopy(model)`` to keep the original untouched.
        recipe: a :class:`~prunequant.Recipe` or a dict validated into one.
        example_input: a batch used to check the traced model runs and to measure it.
        steps_per_epoch: needed when the recipe gives lengths in epochs.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe | dict[str, Any] | None,
        example_input: Tensor,
        steps_per_epoch: int | None = None,
    ):
        if not isinstance(recipe, Recipe):
            recipe = Recipe.from_dict(recipe)
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise RecipeError(f"steps_per_epoch must be a positive integer (got {steps_per_epoch!r})")
        self.recipe = recipe
        self.steps_per_epoch = steps_per_epoch
        p, q = recipe.prune, recipe.quant
        stat = None
        if p is not None:
            stat = p.importance if p.importance in ("a_l1", "a_l0") else "none"
        quant = QuantPolicy()
        if q is not None:
            quant = QuantPolicy(weight_bits=q.weight_bits, act_bits=q.act_bits, power_of_two=q.power_of_two,
                                layer_bits=resolve_layer_bits(model, recipe), act_percentile=q.act_percentile,
                                weight_clip=q.weight_clip, weight_range=q.weight_range)
        self.model, self.plan = instrument(
            model,
            prune_stat=stat,
            exclude=p.exclude if p else (),
            quant=quant,
            example_input=example_input,
            groups=p.groups if p else False,
            group_stat=p.group_stat if p else "mean",
        )
        self.model.register_buffer("pq_step", torch.zeros((), dtype=torch.int64))
        self.example_input = example_input
        if p is not None and not self.plan.sites:
            raise RecipeError("prune: no prunable channels found in this model (every activation is "
                              f"coupled or excluded: {self.plan.skipped})")
        self._check_patterns(model)
        self._warned_eval = False
        self._sparsity = [self._target(s.name) for s in self.plan.sites]
        self._masks: list[ChannelMask] = [self.model.get_submodule(s.mask) for s in self.plan.sites]
        self._wq = {n: weight_quantizer(self.model.get_submodule(n)) for n in self.plan.layers}
        self._wq = {n: w for n, w in self._wq.items() if w is not None}
        self._aq = [m for m in self.model.modules() if isinstance(m, ActQuantizer)]
        self.spec, self.timeline = self._build_timeline()
        self._rng_scores = self._random_scores() if p is not None and p.importance == "random" else None
        with torch.no_grad():  # fail early, with the model's own error, if it does not run
            with eval_mode(self.model):  # shared with the user's model
                self.model(example_input)
        # After the check: step 0 may enable activation quantizers, which have no statistics yet
        # (an eval forward through them would raise).
        self._apply(0)

    def _check_patterns(self, model: nn.Module) -> None:
        """Every pattern of ``prune.exclude``, ``prune.per_layer`` and ``quant.per_layer`` must match
        something; a pattern that matches nothing is a typo that would silently change nothing."""
        p, q = self.recipe.prune, self.recipe.quant
        layers = list(self.plan.layers)
        problems = []

        def check(field: str, pats: Any, names: list[str], noun: str) -> None:
            for pat in pats:
                if any(fnmatch.fnmatchcase(n, pat) for n in names):
                    continue
                msg = f"  {field}: pattern {pat!r} matches no {noun}"
                if field == "prune.per_layer" and any(fnmatch.fnmatchcase(n, pat) for n in layers):
                    msg += " (it matches layers whose output channels cannot be pruned; see plan.skipped)"
                shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                problems.append(msg + (did_you_mean(pat, names) or f" (they are: {shown})"))

        if p is not None:
            modules = [n for n, _ in model.named_modules() if n]
            groups = [s.name for s in self.plan.sites if s.kind == "group"]
            groups += [n for n in self.plan.skipped if n.startswith("group:")]
            check("prune.exclude", p.exclude, layers + [m for m in modules if m not in layers] + groups,
                  "layer, module or group")
            check("prune.per_layer", list(p.per_layer), [s.name for s in self.plan.sites], "prunable layer")
        if q is not None:
            check("quant.per_layer", list(q.per_layer), layers, "conv / linear layer")
        if problems:
            raise RecipeError("recipe patterns that match nothing in this model:\n" + "\n".join(problems))

    # ------------------------------------------------------------------ schedule
    def _target(self, site: str) -> float:
        p = self.recipe.prune
        s = p.sparsity
        for pat, v in p.per_layer.items():
            if fnmatch.fnmatchcase(site, pat):
                s = v
        return s

    def _build_timeline(self) -> tuple[ScheduleSpec | None, Timeline]:
        p, q, spe = self.recipe.prune, self.recipe.quant, self.steps_per_epoch
        wd = ad = 0
        if q is not None:
            wd = _to_steps(q.weight_delay, q.unit, spe, "quant.weight_delay")
            ad = _to_steps(q.act_delay, q.unit, spe, "quant.act_delay")
        spec = None
        if p is not None:
            offset = 0
            if q is not None and self.recipe.ordering == "quantize_then_prune":
                offset = max(wd, ad) + 1
            spec = ScheduleSpec(
                kind=p.schedule,
                n_sites=len(self.plan.sites),
                offset=offset,
                start=_to_steps(p.start, p.unit, spe, "prune.start"),
                interval=_to_steps(p.interval, p.unit, spe, "prune.interval", minimum=1),
                refresh=_to_steps(p.refresh, p.unit, spe, "prune.refresh", minimum=1),
                ramp_steps=p.stepwise_steps,
            )
        qb = None
        if q is not None:
            qb = spec.end + 1 if (spec is not None and self.recipe.ordering == "prune_then_quantize") else 0
        return spec, Timeline(
            prune_begin=spec.begin if spec else None,
            prune_end=spec.end if spec else None,
            quant_begin=qb,
            weight_quant_at=None if qb is None else qb + wd,
            act_quant_at=None if qb is None else qb + ad,
        )

    def _random_scores(self) -> list[Tensor]:
        g = torch.Generator().manual_seed(int(self.recipe.prune.seed))
        return [torch.rand(s.channels, generator=g) for s in self.plan.sites]

    def _scores(self, i: int) -> Tensor:
        imp = self.recipe.prune.importance
        if imp in ("a_l1", "a_l0"):
            mean, count = self._masks[i].mean_stat(), float(self._masks[i].stat_count.max())
            if count <= 0:
                raise ScheduleError(
                    f"step {self.step_count}: the mask of '{self.plan.sites[i].name}' would be chosen from "
                    f"no activation statistics ({imp} importance): no training-mode forward pass ran "
                    "since its window started. Run the model in train mode (model.train()) and call "
                    "comp.step() once after each optimizer step")
            return mean
        if imp == "w_l1":  # a group: the mean over its producers
            return torch.stack([self._weight_l1(p) for p in self.plan.sites[i].producers]).mean(dim=0)
        return self._rng_scores[i]

    def importance(self, i: int) -> Tensor:
        """Importance of site ``i``'s channels by the recipe's measure, as a mask update ranks them:
        the mean statistic its :class:`~prunequant.prune.mask.ChannelMask` has gathered since its last
        reset (A-L1 / A-L0), or its producers' weights (W-L1). Reads state only; used by
        :mod:`prunequant.train.analyze`."""
        return self._scores(i)

    def mask_for(self, i: int, sparsity: float, scores: Tensor | None = None) -> Tensor:
        """The keep-mask (float 0/1) the schedule would set for site ``i`` at ``sparsity`` from
        ``scores`` (default: :meth:`importance`), honouring the site's blocks / partitions and
        ``prune.round_to``."""
        site = self.plan.sites[i]
        return mask_from_scores(self._scores(i) if scores is None else scores, sparsity,
                                round_to=self.recipe.prune.round_to, block=site.block, parts=site.parts)

    def _weight_l1(self, layer: str) -> Tensor:
        """Mean |w| of each output channel of ``layer`` (W-L1)."""
        w = raw_weight(self.model.get_submodule(layer)).detach()
        if w.dim() == 2:  # linear: [out, in]
            return w.abs().mean(dim=1)
        axis = 1 if self.plan.layers[layer].kind == "convT" else 0
        return w.abs().transpose(0, axis).reshape(w.shape[axis], -1).mean(dim=1)

    @property
    def step_count(self) -> int:
        """Number of completed :meth:`step` calls."""
        return int(self.model.pq_step)

    @torch.no_grad()
    def _apply(self, t: int) -> None:
        if self.spec is not None:
            for i, m in enumerate(self._masks):
                ev = self.spec.event(i, t, self._sparsity[i])
                if ev is None:
                    continue
                if ev.start:
                    m.reset_stats()
                    m.collecting.fill_(True)
                if ev.update is not None:
                    m.mask.copy_(self.mask_for(i, ev.update).to(m.mask.device))
                if ev.reset_after:
                    m.reset_stats()
                if ev.freeze:
                    m.collecting.fill_(False)
                    m.frozen.fill_(True)
        tl = self.timeline
        if tl.weight_quant_at is not None and t >= tl.weight_quant_at:
            for name, wq in self._wq.items():
                if not bool(wq.enabled):
                    wq.enabled.fill_(True)
                wq.observe(raw_weight(self.model.get_submodule(name)))
        if tl.act_quant_at is not None and t == tl.act_quant_at:
            for aq in self._aq:
                aq.enabled.fill_(True)

    def step(self) -> None:
        """Advance the schedule by one training step (call after ``optimizer.step()``).

        Under ``torch.distributed`` every rank quantizes with the same bounds: each activation
        quantizer takes the min / max (or percentile) of the global batch in its forward, and each
        collecting mask averages its batch statistic over the ranks (one small collective each per
        step while they gather), so every rank derives the identical mask.
        """
        if not self.model.training and not self._warned_eval and not self.schedule_done:
            self._warned_eval = True
            warnings.warn(
                f"Compressor.step() at step {self.step_count}: the model is in eval mode, so channel masks "
                "gather no activation statistics, activation quantizers no ranges and BatchNorm layers "
                "do not update. Call model.train() before the training loop (evaluation in between "
                "must switch back)", RuntimeWarning, stacklevel=2)
        self.model.pq_step += 1
        self._apply(self.step_count)

    # ------------------------------------------------------------------ state
    @property
    def pruning_done(self) -> bool:
        """True once the schedule has frozen every mask at its target (or there is nothing to prune).

        Masks frozen early by ``finalize(allow_incomplete=True)`` do not count.
        """
        if self.spec is None:
            return True
        return self.step_count >= self.spec.end and all(bool(m.frozen) for m in self._masks)

    @property
    def schedule_done(self) -> bool:
        """True once every event of the schedule has happened: every mask frozen by the schedule and
        every quantizer enabled, with statistics (``finalize()`` is then complete)."""
        return not self.incomplete()

    def incomplete(self) -> list[str]:
        """What the schedule has not done yet at the current step (empty when it is done)."""
        tl, t, out = self.timeline, self.step_count, []
        if self.spec is not None and t < self.spec.end:
            left = [s.name for s, m in zip(self.plan.sites, self._masks) if not bool(m.frozen)]
            out.append(f"{len(left)} of {len(self._masks)} layers not pruned yet (the last mask freezes at "
                       f"step {self.spec.end})")
        if tl.weight_quant_at is not None and t < tl.weight_quant_at:
            out.append(f"weight quantization starts at step {tl.weight_quant_at}")
        if tl.act_quant_at is not None:
            if t < tl.act_quant_at:
                out.append(f"activation quantization starts at step {tl.act_quant_at}")
            elif any(bool(a.enabled) and float(a.stat_count) <= 0 for a in self._aq):
                out.append("activation quantizers have no ranges yet (one more training step needed)")
        return out

    @property
    def total_steps_hint(self) -> int:
        """The last step at which the schedule does something."""
        tl = self.timeline
        vals = [v for v in (tl.prune_end, tl.weight_quant_at, tl.act_quant_at) if v is not None]
        return max(vals) if vals else 0

    def sparsity_report(self) -> list[dict[str, Any]]:
        """Per site: name, channels before / after, target sparsity, frozen."""
        return [
            {"name": s.name, "channels": s.channels, "kept": m.kept, "target_sparsity": sp,
             "frozen": bool(m.frozen), "tied": list(s.tied), "members": list(s.members)}
            for s, m, sp in zip(self.plan.sites, self._masks, self._sparsity)
        ]

    def state_dict(self) -> dict[str, Tensor]:
        """The instrumented model's state dict (weights + every piece of compression state)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a state saved by :meth:`state_dict` (resume mid-schedule)."""
        self.model.load_state_dict(state)

    def finalize(self, shrink: bool = True, allow_incomplete: bool = False) -> nn.Module:
        """Freeze everything and return the compressed model in eval mode.

        Raises :class:`ScheduleError` when the schedule has not finished (layers not pruned yet,
        quantizers not started or without statistics), naming what is missing; with
        ``allow_incomplete=True`` the model is finalized as it is (:attr:`pruning_done` stays False).
        Masks are frozen at their current state and quantizer statistics stop updating. With
        ``shrink=True`` (default) the pruned channels are physically removed
        (:func:`prunequant.graph.shrink`): the result is a smaller dense network computing the same
        function, with its quantizers' state sliced along; ``comp.model`` stays the masked model.
        """
        missing = self.incomplete()
        if missing and not allow_incomplete:
            raise ScheduleError(
                f"finalize() at step {self.step_count}, before the schedule finished: " + "; ".join(missing)
                + f". Train until step {self.total_steps_hint + 1} (comp.total_steps_hint + 1), or pass "
                "allow_incomplete=True to finalize the model as it is")
        for m in self._masks:
            m.collecting.fill_(False)
            m.frozen.fill_(True)
        for aq in self._aq:
            aq.frozen.fill_(True)
        self.model.eval()
        if shrink and self.plan.sites:
            from ..graph.shrink import shrink as _shrink

            return _shrink(self.model).eval()
        return self.model
