"""The bicubic reference row of the super-resolution task: PSNR / SSIM on Y of the held-out images.

Degradation, split and metric conventions: ``prunequant.data.images`` and docs/tasks.md. Bicubic has
no parameters and no randomness, so the numbers only depend on the images, torch's bicubic and the
CPU class (printed with them).

Usage (the numbers in docs/tasks.md)::

    PYTHONPATH=src .venv/bin/python benchmarks/sr_bicubic.py --scales 2 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from prunequant.data.images import bicubic_baseline, load_super_resolution
from prunequant.export.cpu import machine_info


def measure(scales: list[int]) -> dict:
    """``{"machine": ..., "rows": [{scale, split, image, psnr, ssim}, ...]}`` for val and test."""
    rows = []
    for s in scales:
        b = load_super_resolution(s, patches_per_epoch=1)
        for split, ds in (("val", b.val), ("test", b.test)):
            r = bicubic_baseline(ds)
            for name, (p, q) in r["per_image"].items():
                rows.append({"scale": s, "split": split, "image": name, "psnr": p, "ssim": q})
            rows.append({"scale": s, "split": split, "image": "mean", "psnr": r["psnr"], "ssim": r["ssim"]})
    info = machine_info()
    return {"machine": {k: info[k] for k in ("cpu_class", "cpu", "torch")}, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(args.scales)
    m = res["machine"]
    print(f"machine: {m['cpu_class']} ({m['cpu']}), torch {m['torch']}")
    print(f"{'scale':>5}  {'split':<5} {'image':<12} {'PSNR (dB)':>9} {'SSIM':>7}")
    for r in res["rows"]:
        scale = f"x{r['scale']}"
        print(f"{scale:>5}  {r['split']:<5} {r['image']:<12} {r['psnr']:9.2f} {r['ssim']:7.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
