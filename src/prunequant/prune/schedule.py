"""Pruning schedules (METHOD sections 3-4) as pure functions of the step counter.

Every event (window start, mask refresh, freeze) is computed from the step index, so a resumed run
that restores the step counter and the mask buffers continues exactly where it stopped.

* ``layerwise`` (the paper's): layer ``i`` (0-based, forward order) starts gathering at
  ``t_i = P + S + i*(I+1)``; its mask is recomputed every ``R`` steps inside the window and frozen
  at ``t_i + I`` at the full target sparsity; then layer ``i+1`` starts.
* ``oneshot``: every layer gathers from ``P + S`` on the unpruned network, and all are pruned at
  once at the step where layerwise pruning would have finished (``P + S + L*(I+1) - 1``).
* ``stepwise`` (Zhu & Gupta): every layer gathers from ``P + S``; at ``n`` evenly spaced points
  over the same span, the masks are recomputed at sparsity ``s*(1-(1-k/n)**3)`` from the statistics
  since the previous point.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """What a site does at one step."""

    start: bool = False  # reset statistics and start collecting
    update: float | None = None  # recompute the mask at this sparsity
    freeze: bool = False  # stop collecting; the mask is final
    reset_after: bool = False  # stepwise: start a new statistics window after the update


@dataclass(frozen=True)
class ScheduleSpec:
    """Schedule constants, all in steps."""

    kind: str
    n_sites: int
    offset: int  # P: where the pruning phase begins (depends on the ordering)
    start: int  # S
    interval: int  # I
    refresh: int  # R
    ramp_steps: int = 5

    @property
    def span(self) -> int:
        """Steps from the first window start to the step the last mask freezes."""
        return self.n_sites * (self.interval + 1) - 1

    @property
    def begin(self) -> int:
        return self.offset + self.start

    @property
    def end(self) -> int:
        """The step at which the last mask freezes."""
        return self.begin + self.span

    def window(self, i: int) -> tuple[int, int]:
        """``(first step collecting, freeze step)`` of site ``i``."""
        if self.kind == "layerwise":
            t = self.begin + i * (self.interval + 1)
            return t, t + self.interval
        return self.begin, self.end

    def ramp_points(self) -> list[int]:
        """Stepwise: the steps at which masks are recomputed (last one = :attr:`end`)."""
        n = self.ramp_steps
        return [self.begin + max(1, round(k * self.span / n)) for k in range(1, n + 1)]

    def event(self, i: int, step: int, sparsity: float) -> Event | None:
        """The event of site ``i`` at ``step`` (``None`` when nothing happens)."""
        first, last = self.window(i)
        if step < first or step > last:
            return None
        if self.kind == "layerwise":
            if step == first:
                return Event(start=True)
            if step == last:
                return Event(update=sparsity, freeze=True)
            if (step - first) % self.refresh == 0:
                return Event(update=sparsity)
            return None
        if self.kind == "oneshot":
            if step == first:
                return Event(start=True)
            if step == last:
                return Event(update=sparsity, freeze=True)
            return None
        if self.kind == "stepwise":
            if step == first:
                return Event(start=True)
            points = self.ramp_points()
            if step in points:
                n = len(points)
                # When the span is shorter than n, several points share a step: take the last, so
                # the final point (= end) always reaches the target and freezes.
                k = n - points[::-1].index(step)
                s_k = sparsity * (1.0 - (1.0 - k / n) ** 3)
                return Event(update=s_k, freeze=(k == n), reset_after=(k < n))
            return None
        raise ValueError(f"unknown schedule {self.kind!r}")
