"""ONNX Runtime's fused 8-bit kernels vs the exported model, per CPU class, full vs reduced weight range.

Two steps, so that the second one can run under an emulated CPU:

1. ``prepare`` (PyTorch): trains ResNet-20 (width 0.25, 8x8 input) on the 1,797 scikit-learn digits
   with the Compressor exactly as ``tests/export`` does (layerwise pruning to 50 % and W8A8 QAT
   together, ``ordering: joint``), once with ``quant.weight_range: full`` and once with ``reduced``
   (7-bit codes in 8-bit weights, during QAT); exports each as QDQ (default) and QDQ ``fold_bn``;
   stores the inputs and the PyTorch reference outputs (for ``fold_bn``:
   ``fold_batchnorm(model, integer_bias=True)``, the model the file means).
2. ``run`` (onnxruntime + numpy only): runs every file with graph optimization off
   (``ORT_DISABLE_ALL``, float kernels: what the file means on any CPU) and with the default
   ``ORT_ENABLE_ALL`` (fused integer kernels), and prints max abs diff, the share of samples within
   one output step, argmax agreement, and the CPU features (:mod:`prunequant.export.cpu`).

Usage (the numbers in docs/export.md; QEMU 7.2 user mode emulates an AVX2 CPU without VNNI)::

    .venv/bin/python benchmarks/ort_cpu_kernels.py prepare --dir runs/ort_cpu
    .venv/bin/python benchmarks/ort_cpu_kernels.py run --dir runs/ort_cpu
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/ort_cpu_kernels.py run --dir runs/ort_cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FILES = [(rng, fold) for rng in ("full", "reduced") for fold in (False, True)]


def _name(rng: str, fold: bool) -> str:
    return f"resnet20_w8a8_{rng}{'_fold' if fold else ''}"


def prepare(d: Path) -> None:
    """Train, export, and store inputs and reference outputs in ``d``."""
    import torch
    import torch.nn.functional as F

    from prunequant import Compressor
    from prunequant.data import load_dataset
    from prunequant.export import export_onnx
    from prunequant.export.fold import fold_batchnorm
    from prunequant.graph import shrink
    from prunequant.models import build_model

    torch.set_num_threads(1)
    b = load_dataset("digits")
    x, y = (torch.stack([b.train[i][0] for i in range(len(b.train))]).float(),
            torch.as_tensor([b.train[i][1] for i in range(len(b.train))]))
    x_all = torch.cat([torch.stack([ds[i][0] for i in range(len(ds))]) for ds in (b.train, b.val, b.test)])
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "inputs.npy", x_all.numpy())
    for rng in ("full", "reduced"):
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8, width=0.25)
        recipe = {"ordering": "joint",
                  "prune": {"sparsity": 0.5, "unit": "steps", "start": 4, "interval": 1, "refresh": 1},
                  "quant": {"weight_bits": 8, "act_bits": 8, "unit": "steps", "weight_delay": 0,
                            "act_delay": 0, "weight_range": rng}}
        comp = Compressor(model, recipe, x[:8])
        opt = torch.optim.SGD(comp.model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        for _ in range(comp.total_steps_hint + 4):
            idx = torch.randint(0, len(x), (24,), generator=g)
            loss = F.cross_entropy(comp.model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            comp.step()
        small = shrink(comp.finalize(shrink=False)).eval()
        for fold in (False, True):
            export_onnx(small, x[:4], d / f"{_name(rng, fold)}.onnx", fold_bn=fold)
            ref = fold_batchnorm(small, integer_bias=True) if fold else small
            with torch.no_grad():
                np.save(d / f"{_name(rng, fold)}.ref.npy", ref.eval()(x_all).numpy())
    print(f"wrote {len(FILES)} models, inputs and references to {d}")


def run(d: Path) -> dict:
    """Run every file at both optimization levels; print and return the comparison."""
    import onnxruntime as ort

    from prunequant.export.cpu import cpu_features

    cpu = cpu_features()
    x = np.load(d / "inputs.npy").astype(np.float32)
    print(f"CPU: {cpu.brand} ({cpu.name}; flags {' '.join(cpu.flags)}; via {cpu.source}); "
          f"onnxruntime {ort.__version__}; {len(x)} inputs")
    res = {"cpu": cpu.as_dict(), "onnxruntime": ort.__version__, "n": len(x), "models": {}}
    for rng, fold in FILES:
        name = _name(rng, fold)
        ref = np.load(d / f"{name}.ref.npy")
        step = float(ref.max() - ref.min()) / 255
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            sess = ort.InferenceSession(str(d / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
            out = sess.run(None, {"input": x})[0]
            dev = np.abs(out - ref).max(axis=1)
            r = {"max_abs_diff": float(dev.max()), "within_output_step": float(np.mean(dev <= step)),
                 "exact": float(np.mean(dev < 1e-4)),
                 "argmax_agreement": float(np.mean(out.argmax(1) == ref.argmax(1)))}
            res["models"].setdefault(name, {})[level] = r
            print(f"{name:28s} {level:16s} max abs diff {r['max_abs_diff']:.4f}  "
                  f"exact {100 * r['exact']:6.2f} %  "
                  f"within 1 step {100 * r['within_output_step']:6.2f} %  "
                  f"argmax {100 * r['argmax_agreement']:6.2f} %")
    return res


def main() -> None:
    """Command line: ``prepare`` or ``run``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("--dir", default="runs/ort_cpu")
    ap.add_argument("--json", help="also write the run's result here")
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
