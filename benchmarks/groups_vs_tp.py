"""prunequant channel groups across residual adds vs Torch-Pruning, measured on torchvision models.

For each model (``weights=None``, one ``1x3xSxS`` input) and one channel ratio, four cells:

* ``dense``: the unpruned model.
* ``tp``: Torch-Pruning (``tp.pruner.MetaPruner`` with ``tp.importance.MagnitudeImportance(p=1)``,
  ``global_pruning=False``, the final classifier in ``ignored_layers``); its dependency graph prunes
  every layer coupled through a residual add / concatenation together.
* ``pq``: prunequant, ``instrument(..., groups=False)``: only activations that feed layers directly
  (inside a block) are sites; every tensor joined by an add stays whole.
* ``pq_groups``: prunequant, ``instrument(..., groups=True)``: also the channel groups across adds /
  gating products (skipped, with a note, when this prunequant's ``instrument`` has no ``groups``).

prunequant's masks: per site, ``mask_from_scores(scores, ratio, block=site.block, parts=site.parts)``
with scores the weight L1 of the producers' output channels (``--scores random``: uniform random),
then ``shrink()``; the shrunk model must compute what the masked one does (``allclose``, atol 1e-4).

All cells are measured with ``prunequant.measure`` (MACs / params / elements entering conv and linear
layers, one sample; the same definitions for all columns), and the dense / TP models also with
``tp.utils.count_ops_and_params``. "Ratio" is not the same thing in both libraries: Torch-Pruning
removes ``C - int(C * (1 - ratio))`` channels of every coupled group (a layer and everything tied to
it), prunequant removes ``floor(ratio * C)`` channels of every site it found (and nothing elsewhere).

Each (model, method) cell is cached as ``OUT/groups_vs_tp_cache/*.json``, keyed by a hash of this
script and (prunequant cells) of prunequant's sources (``--force`` recomputes);
the table goes to ``OUT/groups_vs_tp.json`` and ``OUT/groups_vs_tp.md``. Full run (about 2 minutes on 2
CPU cores)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/groups_vs_tp.py --size 224

and a quick one::

    .venv/bin/python benchmarks/groups_vs_tp.py --models resnet18 --size 64 --out /tmp/gvt
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import inspect
import json
import platform
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from prunequant import measure
from prunequant.graph import instrument, raw_weight, shrink
from prunequant.prune.mask import mask_from_scores
from prunequant.utils import atomic_write_json, atomic_write_text

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny")
METHODS = ("dense", "tp", "pq", "pq_groups")
LABELS = {"dense": "dense", "tp": "Torch-Pruning", "pq": "prunequant, groups off",
          "pq_groups": "prunequant, groups on"}
ATOL = 1e-4
RATIO_NOTE = ("ratio: Torch-Pruning removes C - int(C*(1-ratio)) channels of every coupled group "
              "(global_pruning=False, classifier ignored); prunequant removes floor(ratio*C) channels of "
              "every site / group it found and nothing elsewhere, so equal ratios need not remove equal "
              "numbers of channels.")


def import_torchvision():
    """torchvision 0.28 beside the CPU-only torch wheel (the approach of tests/tvshim.py)."""
    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}",
                                 "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined
            pass
    import torchvision

    return torchvision


def has_groups() -> bool:
    """Whether this prunequant's ``instrument`` takes ``groups=``."""
    return "groups" in inspect.signature(instrument).parameters


def build(name: str, size: int, seed: int = 0) -> nn.Module:
    """The torchvision model with a fixed random initialization, in eval mode.

    BatchNorm running statistics come from one train-mode pass over 4 random ``size x size`` images:
    with torchvision's initialization and unit running variances, mobilenet_v2 / efficientnet_b0
    outputs are about 1e-9 / 1e-14, and an ``allclose`` of two such outputs would check nothing.
    """
    tv = import_torchvision()
    torch.manual_seed(seed)
    model = getattr(tv.models, name)(weights=None)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: exactly this batch's statistics
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed + 1)))
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def classifier(model: nn.Module) -> nn.Module:
    """The last ``nn.Linear`` (the head Torch-Pruning must leave alone)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def pq_numbers(model: nn.Module, x: torch.Tensor) -> dict:
    m = measure(model, x)
    return {"macs": m.macs, "params": m.params, "act_elements": sum(r.act_elements for r in m.layers),
            "act_mbit": m.act_mbit}


def out_channels(model: nn.Module) -> dict[str, int]:
    """Output channels / features of every conv and linear layer, by module name."""
    return {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
            for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}


def narrowed(model: nn.Module, dense: dict[str, int]) -> list[str]:
    """Conv / linear layers of ``model`` with fewer output channels than in the dense model."""
    return [n for n, c in out_channels(model).items() if n in dense and c < dense[n]]


def reason_kind(reason: str, words: int = 5) -> str:
    """The first words of a 'why not pruned' reason, module / node names as <x>, numbers as N."""
    head = re.split(r"[;(]", reason, maxsplit=1)[0]
    head = re.sub(r"'[^']*'", "<x>", head)
    head = re.sub(r"\d+", "N", head)
    return " ".join(head.split()[:words])


def run_dense(name: str, x: torch.Tensor, phase: Callable[[str], None], **_) -> dict:
    import torch_pruning as tp

    model = build(name, x.shape[-1])
    phase("measure")
    res = pq_numbers(model, x)
    tp_macs, tp_params = tp.utils.count_ops_and_params(model, x)
    res.update(tp_macs=int(tp_macs), tp_params=int(tp_params))
    return res


def run_tp(name: str, x: torch.Tensor, phase: Callable[[str], None], ratio: float, **_) -> dict:
    import torch_pruning as tp

    model = build(name, x.shape[-1])
    dense_out = out_channels(model)
    with torch.no_grad():
        ref_shape = tuple(model(x).shape)
    phase("TP dependency graph")
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  global_pruning=False, pruning_ratio=ratio,
                                  ignored_layers=[classifier(model)])
    phase("TP prune")
    groups = 0
    channels = 0
    for group in pruner.step(interactive=True):
        idxs = group[0].idxs if len(group) else []
        if len(idxs):
            groups += 1
            channels += len(idxs)
        group.prune()
    phase("TP measure")
    model.eval()
    res = pq_numbers(model, x)
    tp_macs, tp_params = tp.utils.count_ops_and_params(model, x)
    res.update(tp_macs=int(tp_macs), tp_params=int(tp_params), pruned_groups=groups,
               pruned_channels=channels, narrowed_layers=narrowed(model, dense_out))
    try:
        with torch.no_grad():
            out = model(x)
        res["runs"] = tuple(out.shape) == ref_shape and bool(torch.isfinite(out).all())
    except Exception as e:  # recorded, not raised: the table says which model TP broke
        res["runs"] = False
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def site_scores(gm: nn.Module, site, how: str, gen: torch.Generator) -> tuple[torch.Tensor, bool]:
    """Weight L1 of the producer output channels that make up the site's channels (True), else random."""
    if how == "l1":
        producers = getattr(site, "producers", None) or [site.producer]
        total = torch.zeros(site.channels, dtype=torch.float64)
        try:
            for p in producers:
                w = raw_weight(gm.get_submodule(p if isinstance(p, str) else p[0])).detach()
                s = w.abs().flatten(1).sum(1).double()
                if s.numel() == site.channels * site.repeat:
                    total += s.reshape(site.channels, site.repeat).sum(1)
                else:
                    raise ValueError
            return total, True
        except (AttributeError, ValueError, TypeError, IndexError):
            pass
    return torch.rand(site.channels, generator=gen, dtype=torch.float64), False


def is_group(site) -> bool:
    """A site with more than one producer (a channel group across an add / product)."""
    if hasattr(site, "kind"):
        return site.kind == "group"
    return len(getattr(site, "members", None) or []) > 0


def run_pq(name: str, x: torch.Tensor, phase: Callable[[str], None], ratio: float, scores: str,
           groups: bool, **_) -> dict:
    if groups and not has_groups():
        return {"not_run": "this prunequant's instrument() has no groups= keyword yet"}
    model = build(name, x.shape[-1])
    dense_out = out_channels(model)
    phase("pq instrument")
    kw = {"groups": groups} if has_groups() else {}
    gm, plan = instrument(model, prune_stat="a_l1", example_input=x, **kw)
    gm.eval()
    phase("pq masks")
    gen = torch.Generator().manual_seed(0)
    removed = 0
    random_scored = 0
    with torch.no_grad():
        for site in plan.sites:
            s, from_weights = site_scores(gm, site, scores, gen)
            random_scored += not from_weights
            m = mask_from_scores(s, ratio, block=site.block, parts=site.parts)
            cm = gm.get_submodule(site.mask)
            cm.mask.copy_(m)
            if hasattr(cm, "frozen"):
                cm.frozen.fill_(True)
            removed += int((m == 0).sum())
    phase("pq shrink")
    with torch.no_grad():
        masked = gm(x)
        small = shrink(gm).eval()
        out = small(x)
    phase("pq measure")
    res = pq_numbers(small, x)
    masked_m = measure(gm, x)
    skipped = dict(plan.skipped)
    res.update(
        sites=len(plan.sites), group_sites=sum(is_group(s) for s in plan.sites), pruned_channels=removed,
        random_scored_sites=random_scored,
        allclose=bool(torch.allclose(masked, out, atol=ATOL))
        and float((masked - out).abs().max()) <= ATOL * float(masked.abs().max()),
        max_abs_diff=float((masked - out).abs().max()), output_scale=float(masked.abs().max()),
        masked_equals_shrunk_counts=(masked_m.macs, masked_m.params) == (res["macs"], res["params"]),
        narrowed_layers=narrowed(small, dense_out), skipped_count=len(skipped),
        skipped_kinds=dict(Counter(reason_kind(r) for r in skipped.values()).most_common()),
        skipped=skipped)
    return res


RUNNERS = {"dense": run_dense, "tp": run_tp, "pq": lambda *a, **k: run_pq(*a, groups=False, **k),
           "pq_groups": lambda *a, **k: run_pq(*a, groups=True, **k)}


def versions() -> dict:
    import torch_pruning as tp

    tv = import_torchvision()
    return {"torch": torch.__version__, "torchvision": tv.__version__,
            "torch_pruning": tp_version(tp), "prunequant": prunequant_revision(),
            "python": platform.python_version()}


def tp_version(tp) -> str:
    """The installed torch-pruning distribution's version (its ``__version__`` can lag behind)."""
    try:
        return importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        return getattr(tp, "__version__", "?")


def source_digest() -> str:
    """A short hash of prunequant's Python sources (keys the cached prunequant cells)."""
    import prunequant

    h = hashlib.sha1()
    root = Path(prunequant.__file__).resolve().parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:10]


def prunequant_revision() -> str:
    """The git commit of the prunequant source measured, marked when ``src/`` has uncommitted changes."""
    import prunequant

    src = Path(prunequant.__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "."], cwd=src, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted src changes" if dirty else "")


def fmt_m(v: float) -> str:
    return f"{v / 1e6:.1f}M"


def frac(cell: dict, dense: dict, key: str) -> str:
    return f"{cell[key] / dense[key]:.2f}" if dense.get(key) else "-"


def markdown(report: dict) -> str:
    lines = [
        f"# prunequant channel groups vs Torch-Pruning (ratio {report['ratio']}, "
        f"input 1x3x{report['size']}x{report['size']})", "",
        f"CPU: {report['cpu']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
        f"Command: `{report['command']}`", "",
        "MACs / params / activations: `prunequant.measure` on one sample, the same definitions for every "
        "column (activations: elements entering conv / linear layers; Mbit at 32 bits). `tp MACs`: "
        "`tp.utils.count_ops_and_params`. Fractions are of the dense model.", "",
        "| model | method | MACs | params | act elems | act Mbit | MACs frac | params frac | act frac "
        "| tp MACs | pruned sites (groups) | pruned ch | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cells in report["models"].items():
        d = cells.get("dense", {})
        for meth in METHODS:
            c = cells.get(meth)
            if c is None:
                continue
            if "not_run" in c or "error" in c and "macs" not in c:
                lines.append(f"| {name} | {LABELS[meth]} | " + " | ".join(["-"] * 10)
                             + f" | {c.get('not_run') or c.get('error')} |")
                continue
            if meth == "tp":
                sites = f"{c['pruned_groups']} groups"
                check = "runs" if c.get("runs") else f"FAILS: {c.get('error', 'bad output')}"
            elif meth.startswith("pq"):
                sites = f"{c['sites']} ({c['group_sites']})"
                check = ("masked == shrunk" if c["allclose"] else
                         f"MISMATCH max {c['max_abs_diff']:.2g}")
            else:
                sites, check = "-", "-"
            tpm = fmt_m(c["tp_macs"]) if "tp_macs" in c else "-"
            lines.append(
                f"| {name} | {LABELS[meth]} | {fmt_m(c['macs'])} | {fmt_m(c['params'])} | "
                f"{fmt_m(c['act_elements'])} | {c['act_mbit']:.1f} | {frac(c, d, 'macs')} | "
                f"{frac(c, d, 'params')} | {frac(c, d, 'act_elements')} | {tpm} | {sites} | "
                f"{c.get('pruned_channels', '-')} | {check} |")
    lines += ["", "## Why prunequant left activations unpruned (`plan.skipped`, by first words)", ""]
    for name, cells in report["models"].items():
        for meth in ("pq", "pq_groups"):
            c = cells.get(meth)
            if not c or "skipped_kinds" not in c:
                continue
            kinds = "; ".join(f"{k}: {n}" for k, n in c["skipped_kinds"].items()) or "none"
            rnd = c.get("random_scored_sites", 0)
            lines.append(f"- {name}, {LABELS[meth]} ({c['skipped_count']} skipped): {kinds}"
                         + (f" ({rnd} sites scored at random)" if rnd and report["scores"] == "l1" else ""))
    lines += ["", "## Layers Torch-Pruning narrows (fewer output channels) that prunequant leaves whole", ""]
    for name, cells in report["models"].items():
        tp_layers = set(cells.get("tp", {}).get("narrowed_layers", []))
        for meth in ("pq", "pq_groups"):
            c = cells.get(meth)
            if not c or "narrowed_layers" not in c or not tp_layers:
                continue
            miss = [n for n in cells["tp"]["narrowed_layers"] if n not in set(c["narrowed_layers"])]
            extra = [n for n in c["narrowed_layers"] if n not in tp_layers]
            shown = ", ".join(f"`{n}`" for n in miss[:8]) + (f", ... ({len(miss) - 8} more)" if len(miss) > 8
                                                              else "")
            lines.append(f"- {name}, {LABELS[meth]}: {len(miss)} of {len(tp_layers)}"
                         + (f": {shown}" if miss else "")
                         + (f"; narrowed by prunequant only: {len(extra)}" if extra else ""))
    lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--size", type=int, default=224, help="input height = width")
    p.add_argument("--ratio", type=float, default=0.5, help="channel ratio removed")
    p.add_argument("--scores", choices=("l1", "random"), default="l1",
                   help="prunequant channel scores: producer weight L1 or random")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--force", action="store_true", help="recompute cached cells")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--note", action="append", default=[], help="a line added to the report's notes")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    command = shlex.join(["python", "benchmarks/groups_vs_tp.py", *(sys.argv[1:] if argv is None else argv)])
    cache = a.out / "groups_vs_tp_cache"
    cache.mkdir(parents=True, exist_ok=True)
    x = torch.randn(1, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    report_models: dict[str, dict] = {}
    digest = source_digest()  # once, at start: the sources this process imported (edits later do not count)
    script = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:8]  # a changed benchmark recomputes
    cells = [(m, k) for m in a.models for k in a.methods]
    bar = tqdm(cells, desc="groups_vs_tp", unit="cell", file=sys.stderr)
    for name, meth in bar:
        key = f"{name}-{meth}-s{a.size}-r{a.ratio:g}-b{script}"
        if meth.startswith("pq"):  # a changed prunequant source does not reuse its old cells
            key += f"-{a.scores}-pq{digest}"
        path = cache / f"{key}.json"

        def phase(what: str, name=name, meth=meth) -> None:
            bar.set_postfix_str(f"{name} {meth}: {what}")

        if path.exists() and not a.force:
            phase("cached")
            res = json.loads(path.read_text())
        else:
            phase("build")
            t0 = time.perf_counter()
            try:
                res = RUNNERS[meth](name, x, phase, ratio=a.ratio, scores=a.scores)
            except Exception as e:  # one failing cell does not lose the others; not cached
                res = {"error": f"{type(e).__name__}: {e}"}
            res["seconds"] = round(time.perf_counter() - t0, 2)
            if "not_run" not in res and "error" not in res:
                atomic_write_json(path, res)
        report_models.setdefault(name, {})[meth] = res
    bar.close()
    from prunequant.export.cpu import cpu_features

    notes = [RATIO_NOTE,
             "Models are torchvision's with weights=None (a fixed random init, torch.manual_seed(0)); "
             f"prunequant scores: {'producer weight L1' if a.scores == 'l1' else 'uniform random'}.",
             "Torch-Pruning: MagnitudeImportance(p=1), global_pruning=False, last Linear ignored.",
             "prunequant: instrument(prune_stat='a_l1', example_input=x[, groups=...]), masks from "
             "mask_from_scores(scores, ratio, block=site.block, parts=site.parts), then shrink(); "
             f"'masked == shrunk': torch.allclose(atol={ATOL}) of the two outputs and max |difference| <= "
             f"{ATOL} x max |masked output|.",
             "BatchNorm running statistics: one train-mode pass over 4 random images of the input size "
             "(torchvision's init with unit running variances gives mobilenet_v2 / efficientnet_b0 "
             "outputs of about 1e-9 / 1e-14, which would make the output check vacuous)."]
    notes += a.note
    if "pq_groups" in a.methods and not has_groups():
        notes.append("prunequant groups on: not measured, this prunequant's instrument() has no "
                     "groups= keyword yet.")
    report = {"command": command, "cpu": cpu_features().name, "versions": versions(), "size": a.size,
              "ratio": a.ratio, "scores": a.scores, "notes": notes, "models": report_models}
    atomic_write_json(a.out / "groups_vs_tp.json", report)
    atomic_write_text(a.out / "groups_vs_tp.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
