"""The ranking analysis behind ``prunequant analyze`` (METHOD section 7, the paper's motivation).

For every prunable site ``i`` (plan order) and importance measure (A-L1, A-L0, W-L1), the channel
importance of ``i`` is measured on a fixed calibration set (the first ``N`` un-augmented training
images) with its *preceding site* dense, then with that site pruned at each sparsity ``s`` (its mask
chosen by the same measure on the dense network; every other site stays dense), and each estimate
is compared with the dense one (:func:`prunequant.prune.ranking.compare`: Kendall's tau-a, the edit
distance between the rank sequences, the overlap of the channels kept at the site's own target).

The preceding site is the nearest site upstream in the graph whose mask reaches ``i``'s producer
input (in a ResNet, the previous block's internal channels, through its second conv and the
residual add), else the previous site in plan order; the first site has none.

The importance code is the compressor's own: a :class:`~prunequant.Compressor` per measure (no
quantizers) gathers the statistics in its masks and ranks them with :meth:`Compressor.importance` /
:meth:`Compressor.mask_for`. The analysis works on copies of the dense network; it never runs during
training.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..export.cpu import machine_info
from ..graph.plan import Plan
from ..prune.mask import ACTIVATION_STATS
from ..prune.ranking import compare, rank_sequence
from ..recipe import PruneConfig, Recipe, RecipeError, did_you_mean
from .compressor import Compressor

#: the measures the analysis compares (``random`` does not depend on anything, so it is not offered).
MEASURES = ("a_l1", "a_l0", "w_l1")
LABELS = {"a_l1": "A-L1", "a_l0": "A-L0", "w_l1": "W-L1"}
DEFAULT_SPARSITIES = (0.25, 0.5, 0.75)
DEFAULT_CALIB = 1024
MODES = ("train", "eval")
SCHEMA_VERSION = 1


def check_measures(measures: Sequence[str]) -> list[str]:
    """The measures, validated (order kept, duplicates dropped); :class:`RecipeError` for an unknown one."""
    out: list[str] = []
    for m in measures:
        if m not in MEASURES:
            raise RecipeError(f"--measures: unknown measure {m!r}{did_you_mean(m, MEASURES)}; allowed: "
                              f"{', '.join(MEASURES)}")
        if m not in out:
            out.append(m)
    if not out:
        raise RecipeError(f"--measures: give at least one of {', '.join(MEASURES)}")
    return out


def check_sparsities(values: Sequence[str | float]) -> list[float]:
    """Preceding-layer sparsities, each in (0, 1) (order kept, duplicates dropped)."""
    out: list[float] = []
    for v in values:
        try:
            s = float(v)
        except (TypeError, ValueError):
            raise RecipeError(f"--sparsities: {v!r} is not a number; give fractions in (0, 1), e.g. "
                              "--sparsities 0.25 0.5 0.75") from None
        if not 0.0 < s < 1.0 or math.isnan(s):
            raise RecipeError(f"--sparsities: {v} is outside (0, 1); give fractions of the preceding layer's "
                              "channels to remove, e.g. --sparsities 0.25 0.5 0.75")
        if s not in out:
            out.append(s)
    if not out:
        raise RecipeError("--sparsities: give at least one value in (0, 1)")
    return out


def _key(s: float) -> str:
    return f"{s:g}"


def _mask_owner(n: fx.Node, masks: dict[str, str]) -> str | None:
    """The site whose mask ``n`` applies (its call, or a read of its ``mask`` buffer), else None."""
    t = str(n.target)
    if n.op == "call_module" and t in masks:
        return masks[t]
    if n.op == "get_attr" and t.endswith(".mask") and t[: -len(".mask")] in masks:
        return masks[t[: -len(".mask")]]
    return None


def preceding_sites(gm: fx.GraphModule, plan: Plan) -> list[tuple[str | None, str | None]]:
    """Per site (plan order): ``(preceding site, how it was found)``.

    ``"graph"``: the nearest mask upstream of the site's producer inputs (breadth first; at equal
    distance the site latest in plan order); ``"plan_order"``: no mask upstream, the previous site in
    plan order; ``(None, None)``: the first site with no mask upstream.
    """
    masks = {s.mask: s.name for s in plan.sites}
    order = {s.name: k for k, s in enumerate(plan.sites)}
    by_target: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            by_target.setdefault(str(n.target), []).append(n)
    out: list[tuple[str | None, str | None]] = []
    for k, site in enumerate(plan.sites):
        start = [n for p in site.producers for n in by_target.get(p, [])]
        seen: set[fx.Node] = set(start)
        frontier = [a for n in start for a in n.all_input_nodes]
        found: str | None = None
        while frontier and found is None:
            hits: set[str] = set()
            nxt: list[fx.Node] = []
            for n in frontier:
                if n in seen:
                    continue
                seen.add(n)
                owner = _mask_owner(n, masks)
                if owner is not None and owner != site.name:
                    hits.add(owner)
                    continue  # nearest only: do not look past a mask
                nxt.extend(n.all_input_nodes)
            if hits:
                found = max(hits, key=order.__getitem__)
            frontier = nxt
        if found is not None:
            out.append((found, "graph"))
        elif k > 0:
            out.append((plan.sites[k - 1].name, "plan_order"))
        else:
            out.append((None, None))
    return out


def calibration_batches(dataset: Dataset, n: int, batch_size: int) -> tuple[list[Tensor], int]:
    """The first ``n`` images of ``dataset`` (its un-augmented base when it augments), in batches of
    ``batch_size`` (deterministic); returns ``(batches, images used)``."""
    base = getattr(dataset, "base", dataset)  # AugmentedDataset: random crops / flips would not repeat
    used = min(int(n), len(base))
    loader = DataLoader(Subset(base, range(used)), batch_size=batch_size, shuffle=False)
    return [x for x, *_ in loader], used


def _recipe(prune: PruneConfig | None, measure: str) -> Recipe:
    """The run's pruning placement (exclude, groups, per-layer targets, round_to) with ``measure`` and
    a schedule that never fires (the analysis sets masks itself); no quantizers."""
    base = prune.model_dump() if prune is not None else {}
    base.update(importance=measure, unit="steps", start=1_000_000, interval=1, refresh=1,
                schedule="layerwise")
    return Recipe(prune=PruneConfig(**base), quant=None)


@torch.no_grad()
def _gather(model: fx.GraphModule, masks: list[nn.Module], batches: Iterable[Tensor], mode: str,
            device: torch.device) -> None:
    """Fresh statistics in every mask from one pass over ``batches`` (BatchNorm in ``mode``)."""
    was = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode == "train")
        for m in masks:
            m.reset_stats()
            m.collecting.fill_(True)
            m.train()  # a mask gathers in training mode only; "eval" keeps the rest in eval mode
        with torch.random.fork_rng(devices=[]):  # the same dropout draws in every pass
            torch.manual_seed(0)
            for x in batches:
                model(x.to(device))
    finally:
        for m in masks:
            m.collecting.fill_(False)
        for m, t in was:
            m.training = t


def _importance(comp: Compressor, masks: list[nn.Module], measure: str, batches: Iterable[Tensor], mode: str,
                device: torch.device) -> list[Tensor]:
    """Every site's importance under ``measure`` in the network as its masks are now (one
    statistics pass over ``batches`` for an activation measure)."""
    if measure in ACTIVATION_STATS:
        _gather(comp.model, masks, batches, mode, device)
    return [comp.importance(i).detach().cpu().to(torch.float64) for i in range(len(masks))]


def analyze_ranking(
    model: nn.Module,
    example_input: Tensor,
    batches: Sequence[Tensor],
    *,
    prune: PruneConfig | None = None,
    measures: Sequence[str] = MEASURES,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    mode: str = "train",
    progress: bool = False,
) -> dict[str, Any]:
    """Rank every site's channels with the preceding site dense and pruned; compare (module docs).

    ``model``: the dense network (not modified: each measure works on a copy). ``prune``: the run's
    pruning section (placement and per-layer targets; its importance and schedule are ignored).
    ``mode``: BatchNorm while the statistics gather, ``"train"`` (batch statistics, as the
    compressor gathers them during fine-tuning) or ``"eval"`` (running statistics).
    Returns ``{"mode", "measures", "sparsities", "sites": [...], "summary": {...}, "reading": str}``.
    """
    measures = check_measures(measures)
    sparsities = check_sparsities(sparsities)
    if mode not in MODES:
        raise RecipeError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sites: list[dict[str, Any]] = []
    bar = None
    try:
        for measure in measures:
            comp = Compressor(copy.deepcopy(model), _recipe(prune, measure), example_input.to(device),
                              steps_per_epoch=1)
            gm, plan = comp.model, comp.plan
            masks = [gm.get_submodule(s.mask) for s in plan.sites]
            targets = [r["target_sparsity"] for r in comp.sparsity_report()]
            pred = preceding_sites(gm, plan)
            index = {s.name: k for k, s in enumerate(plan.sites)}
            preds = [p for p in dict.fromkeys(p for p, _ in pred) if p is not None]
            if not sites:
                sites = [{"name": s.name, "channels": s.channels, "target_sparsity": t, "predecessor": p,
                          "predecessor_via": via,
                          "predecessor_channels": plan.sites[index[p]].channels if p else None,
                          "measures": {}}
                         for s, t, (p, via) in zip(plan.sites, targets, pred)]
                bar = tqdm(total=len(measures) * (1 + len(preds) * len(sparsities)), disable=not progress,
                           dynamic_ncols=True, file=sys.stderr,
                           mininterval=0.5 if sys.stderr.isatty() else 15.0)
            label = LABELS[measure]
            bar.set_description_str(f"{label}: dense network")
            dense = _importance(comp, masks, measure, batches, mode, device)
            bar.update(1)
            kept_dense = [comp.mask_for(i, targets[i], dense[i]) for i in range(len(masks))]
            for rec, d in zip(sites, dense):
                rec["measures"][measure] = {"dense_scores": d.tolist(), "dense_ranking": rank_sequence(d),
                                            "preceding": None if rec["predecessor"] is None else {}}
            for p in preds:
                j = index[p]
                for s in sparsities:
                    pmask = comp.mask_for(j, s, dense[j])
                    masks[j].mask.copy_(pmask.to(masks[j].mask.device))
                    bar.set_description_str(f"{label}: {p} pruned {100 * s:g} %")
                    try:
                        now = _importance(comp, masks, measure, batches, mode, device)
                        bar.update(1)
                    finally:
                        masks[j].mask.fill_(1.0)
                    for i, rec in enumerate(sites):
                        if rec["predecessor"] != p:
                            continue
                        kept = comp.mask_for(i, targets[i], now[i])
                        res = compare(dense[i], now[i], kept_dense[i], kept)
                        rec["measures"][measure]["preceding"][_key(s)] = {
                            "predecessor_kept": int(pmask.count_nonzero()), "scores": now[i].tolist(), **res}
            del comp, masks
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(sites, measures, sparsities)
    return {"mode": mode, "measures": measures, "sparsities": sparsities, "sites": sites,
            "summary": summary, "reading": reading(summary, measures, sparsities)}


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else None


def summarize(sites: list[dict[str, Any]], measures: Sequence[str],
              sparsities: Sequence[float]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per measure and preceding sparsity: the mean tau, edit distance (and over n), kept overlap over
    the sites that have a preceding site."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in measures:
        out[m] = {}
        for s in sparsities:
            rows = [r["measures"][m]["preceding"][_key(s)] for r in sites if r["predecessor"] is not None]
            out[m][_key(s)] = {
                "layers": len(rows),
                "mean_tau": _mean([r["tau"] for r in rows]),
                "min_tau": min((r["tau"] for r in rows if r["tau"] is not None), default=None),
                "mean_edit_distance": _mean([r["edit_distance"] for r in rows]),
                "mean_edit_distance_norm": _mean([r["edit_distance_norm"] for r in rows]),
                "mean_kept_overlap": _mean([r["kept_overlap"] for r in rows]),
            }
    return out


def reading(summary: dict[str, dict[str, dict[str, Any]]], measures: Sequence[str],
            sparsities: Sequence[float]) -> str:
    """One sentence on what the numbers say about the paper's claim (for the paper's A-L1 when analysed)."""
    m = "a_l1" if "a_l1" in measures else measures[0]
    rows = [summary[m][_key(s)] for s in sparsities]
    if not rows or rows[0]["layers"] == 0 or any(r["mean_tau"] is None for r in rows):
        return "No site has a preceding site, so no ranking changes could be measured."
    taus = " / ".join(f"{r['mean_tau']:.2f}" for r in rows)
    sps = " / ".join(f"{100 * s:g}" for s in sparsities)
    last = rows[-1]
    worst = min(r["mean_tau"] for r in rows)
    how = "strongly" if worst < 0.5 else ("clearly" if worst < 0.8 else ("a little" if worst < 0.95 else
                                                                          "hardly"))
    return (f"With {LABELS[m]} the mean Kendall tau against the dense ranking is {taus} when the preceding "
            f"layer is {sps} % pruned, and at {100 * sparsities[-1]:g} % "
            f"{100 * (1 - last['mean_kept_overlap']):.0f} % of the channels kept at the layer's own target "
            f"change: the ranking depends {how} on the preceding layer's sparsity (tau < 0.5: strongly, "
            "< 0.8: clearly, < 0.95: a little).")


def run_analysis(
    cfg: Any,
    model: nn.Module,
    data: Any,
    *,
    calib: int = DEFAULT_CALIB,
    measures: Sequence[str] = MEASURES,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    mode: str = "train",
    progress: bool = True,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`analyze_ranking` on the first ``calib`` training images of ``data`` (a
    :class:`~prunequant.data.DataBundle`) with the configuration ``cfg`` (a
    :class:`~prunequant.config.RunConfig`: its pruning placement, batch size, device); returns the
    ``ranking.json`` content."""
    from .. import __version__
    from .trainer import resolve_device

    if int(calib) < 1:
        raise RecipeError(f"--calib: must be a positive number of images (got {calib})")
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    batches, used = calibration_batches(data.train, calib, cfg.data.batch_size)
    model = model.to(device).eval()
    res = analyze_ranking(model, batches[0][:8], batches, prune=cfg.recipe.prune, measures=measures,
                          sparsities=sparsities, mode=mode, progress=progress)
    return {
        "schema_version": SCHEMA_VERSION,
        "prunequant_version": __version__,
        "source": source or {},
        "model": cfg.model.model_dump(),
        "data": {"name": data.name, "calibration_split": "train", "calibration_images": used,
                 "calibration_requested": int(calib), "batch_size": cfg.data.batch_size,
                 "augmented": False},
        "device": str(device),
        "machine": machine_info(),
        "definitions": {
            "predecessor": "nearest site upstream whose mask reaches the site's producer input (graph), else "
                           "the previous site in plan order; pruned by the same measure on the dense network",
            "tau": "Kendall tau-a of the importance scores, 2/(n(n-1)) sum_{k<j} sign(mu_k-mu_j) "
                   "sign(nu_k-nu_j) (ties count 0)",
            "edit_distance": "Levenshtein distance between the rank sequences (channel indices from most to "
                             "least important; ties: the higher index first)",
            "kept_overlap": "|kept_dense & kept_s| / |kept| at the site's own target sparsity",
            "mode": "BatchNorm during the statistics pass: train = batch statistics (as the compressor "
                    "gathers them), eval = running statistics",
        },
        **res,
    }


def write_analysis(analysis: dict[str, Any], out: str | Path, summary_md: str | Path,
                   run_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``ranking.json`` and ``ranking_tau.png`` into ``out`` (atomically), record them in
    ``run_dir``'s manifest when ``out`` is inside it, and put the summary section into ``summary_md``
    (replacing an earlier one)."""
    from ..report import plot_ranking_heatmap, put_section, ranking_summary_markdown
    from ..runfolder import RunFolder
    from ..utils import atomic_write_json

    out = Path(out)
    paths = {"ranking": atomic_write_json(out / "ranking.json", analysis)}
    plot_ranking_heatmap(analysis, out / "ranking_tau.png")
    paths["heatmap"] = out / "ranking_tau.png"
    summary_md = Path(summary_md)
    try:
        rel = out.resolve().relative_to(Path(run_dir).resolve()) if run_dir is not None else None
    except ValueError:
        rel = None
    if rel is not None:
        RunFolder(run_dir).record(*(str(rel / p.name) if str(rel) != "." else p.name for p in paths.values()))
    image = Path(os.path.relpath(paths["heatmap"].resolve(), summary_md.resolve().parent))
    put_section(summary_md, ranking_summary_markdown(analysis, image=image.as_posix()))
    paths["summary"] = summary_md
    return paths


__all__ = ["DEFAULT_CALIB", "DEFAULT_SPARSITIES", "MEASURES", "analyze_ranking", "calibration_batches",
           "check_measures", "check_sparsities", "preceding_sites", "reading", "run_analysis", "summarize",
           "write_analysis"]
