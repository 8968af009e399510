"""The fidelity table of docs/export.md: exported QDQ files in ONNX Runtime vs the PyTorch models.

The models are those of ``tests/export`` (``tests/export/export_helpers.py``: trained on the 1,797
scikit-learn digits with the Compressor, layerwise pruning to 50 % and QAT together, shrunk).
Two steps, so that the second can run under an emulated CPU:

1. ``prepare`` (PyTorch): exports every (model, bits) as QDQ, and at W8A8 also as QDQ ``fold_bn``;
   stores the inputs and the PyTorch outputs of the model each file means (the trained model; for
   ``fold_bn`` ``fold_batchnorm(model, integer_bias=True)``) and, for ``fold_bn``, of the trained
   model too (the folding's own deviation).
2. ``run`` (onnxruntime + numpy): each file with graph optimization off (``ORT_DISABLE_ALL``: the
   file's meaning, on every CPU) and with the default ``ORT_ENABLE_ALL`` (fused integer kernels),
   against its reference; prints a markdown table and the CPU (:mod:`prunequant.export.cpu`).

Usage::

    .venv/bin/python benchmarks/export_fidelity.py prepare --dir runs/fidelity
    .venv/bin/python benchmarks/export_fidelity.py run --dir runs/fidelity --json out.json
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/export_fidelity.py run --dir runs/fidelity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

CASES = [(m, b, fold, rng) for m in ("resnet20", "mobilenetv2", "espcn")
         for b in ((8, 8), (4, 4), (2, 8)) for fold in ((False, True) if b == (8, 8) else (False,))
         for rng in ("full",)] + [("resnet20", (8, 8), fold, "reduced") for fold in (False, True)] + [
    ("resnet20", (4, 4), False, "reduced"), ("resnet20", (2, 8), False, "reduced")]


def _name(m: str, b: tuple[int, int], fold: bool, rng: str) -> str:
    return f"{m}_W{b[0]}A{b[1]}{'_reduced' if rng == 'reduced' else ''}{'_fold' if fold else ''}"


def prepare(d: Path) -> None:
    """Train (as tests/export does), export, store inputs and references."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
    from export_helpers import deployable, eval_inputs, torch_run

    from prunequant.export import export_onnx
    from prunequant.export.fold import fold_batchnorm

    torch.set_num_threads(1)
    d.mkdir(parents=True, exist_ok=True)
    for m, b, fold, rng in CASES:
        name = _name(m, b, fold, rng)
        model, ex = deployable(m, *b, rng)
        x = eval_inputs(m)
        np.save(d / f"{m}.inputs.npy", x.numpy())
        export_onnx(model, ex, d / f"{name}.onnx", fold_bn=fold)
        means = fold_batchnorm(model, integer_bias=True) if fold else model
        np.save(d / f"{name}.ref.npy", torch_run(means, x))
        if fold:
            np.save(d / f"{name}.trained.npy", torch_run(model, x))
        print("prepared", name)


def _row(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    dev = np.abs(out - ref).reshape(len(ref), -1).max(axis=1)
    step = (ref.max() - ref.min()) / 255
    r = {"exact": float(np.mean(dev < 1e-4)), "within_step": float(np.mean(dev <= step)),
         "max_abs_diff": float(dev.max())}
    if ref.ndim == 2:
        r["argmax"] = float(np.mean(out.argmax(1) == ref.argmax(1)))
    return r


def run(d: Path) -> dict:
    """Run every file at both levels; print the markdown table, return the numbers."""
    import onnxruntime as ort

    from prunequant.export.cpu import cpu_features

    cpu = cpu_features()
    print(f"CPU: {cpu.brand} ({cpu.name}; flags {' '.join(cpu.flags)}); onnxruntime {ort.__version__}\n")
    print("| model | bits | export | ORT level | samples exact (< 1e-4) | within 1 output step "
          "| max abs diff | argmax agreement |\n|---|---|---|---|---:|---:|---:|---:|")
    res: dict = {"cpu": cpu.as_dict(), "onnxruntime": ort.__version__, "rows": {}}

    def show(m, b, exp, level, r):
        am = f"{100 * r['argmax']:.2f}%" if "argmax" in r else "-"
        print(f"| {m} | W{b[0]}A{b[1]} | {exp} | {level} | {100 * r['exact']:.2f}% | "
              f"{100 * r['within_step']:.2f}% | {r['max_abs_diff']:.3g} | {am} |")

    for m, b, fold, rng in CASES:
        name = _name(m, b, fold, rng)
        x = np.load(d / f"{m}.inputs.npy").astype(np.float32)
        ref = np.load(d / f"{name}.ref.npy")
        exp = "QDQ" + (" fold_bn" if fold else "") + (" reduced" if rng == "reduced" else "")
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            sess = ort.InferenceSession(str(d / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
            out = sess.run(None, {"input": x})[0]
            r = res["rows"].setdefault(name, {})[level] = _row(out, ref)
            show(m, b, exp, level, r)
        if fold:  # the folding's own deviation: reference vs the trained model, both PyTorch
            r = res["rows"][name]["folded_vs_trained"] = _row(ref, np.load(d / f"{name}.trained.npy"))
            show(m, b, exp, "PyTorch: folded vs trained", r)
    return res


def main() -> None:
    """Command line: ``prepare`` or ``run``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("--dir", default="runs/fidelity")
    ap.add_argument("--json", help="also write the run's numbers here")
    a = ap.parse_args()
    if a.step == "prepare":
        prepare(Path(a.dir))
    else:
        res = run(Path(a.dir))
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
