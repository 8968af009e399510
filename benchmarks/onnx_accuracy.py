"""Test accuracy of an exported QDQ ONNX file in ONNX Runtime, next to the run's PyTorch number.

prunequant export runs/bench --format qdq
python benchmarks/onnx_accuracy.py runs/bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from prunequant.data import load_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--onnx", help="default: RUN_DIR/model.qdq.onnx")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    rep = json.loads((run_dir / "report.json").read_text())
    d = rep["config"]["data"]
    data = load_dataset(rep["data"]["name"], root=d.get("root"), test_subset=d.get("test_subset"))
    xs = torch.stack([data.test[i][0] for i in range(len(data.test))]).numpy()
    ys = np.array([int(data.test[i][1]) for i in range(len(data.test))])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(
        str(a.onnx or run_dir / "model.qdq.onnx"), so, providers=["CPUExecutionProvider"]
    )
    name = sess.get_inputs()[0].name
    preds = np.concatenate(
        [sess.run(None, {name: xs[i : i + 500]})[0].argmax(1) for i in range(0, len(xs), 500)]
    )
    acc = 100.0 * float((preds == ys).mean())
    print(
        f"ONNX Runtime test accuracy: {acc:.2f} % on {len(ys)} images; "
        f"PyTorch (report.json final): {rep['phases']['final']['accuracy']:.2f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
