"""Run an exported QDQ file the way a user will (ONNX Runtime, default settings, this CPU) and say
how far it is from the PyTorch model, what the CPU is, and when its 8-bit kernels saturate.

ONNX Runtime's default graph optimization (``ORT_ENABLE_ALL``) fuses ``DequantizeLinear -> Conv ->
QuantizeLinear`` into integer kernels (``QLinearConv``, ``QGemm``, ...). With full-range 8-bit
weights those saturate on x86-64 CPUs without VNNI (see :mod:`prunequant.export.cpu`); the file is
right, the CPU's fast path is not. :func:`check_onnx` measures it on real inputs and names the fix.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..quant.quantizers import WeightQuantizer
from ..utils import eval_mode
from .cpu import cpu_features

#: ONNX Runtime op types that run 8-bit integer arithmetic
INTEGER_OPS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                         "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul"})

FIX = ("retrain with `recipe.quant.weight_range: reduced` (7-bit codes in the 8-bit weights, so two "
       "uint8 x int8 products fit 16 bits), or run on a CPU with VNNI, or create the ONNX Runtime "
       "session with graph_optimization_level ORT_ENABLE_BASIC (float kernels, exact but slower)")


def full_range_8bit(model: nn.Module) -> bool:
    """Whether an enabled weight quantizer of ``model`` uses 8 bits over the full range [-128, 127]."""
    return any(isinstance(m, WeightQuantizer) and bool(m.enabled) and m.bits == 8 and m.qmin == -128
               for m in model.modules())


def _session(path: Path, level: str | None, threads: int | None, optimized: Path | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if level is not None:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if threads:
        so.intra_op_num_threads = threads
    if optimized is not None:  # written only to list the kernels chosen; ORT's warning about it is noise
        so.optimized_model_filepath = str(optimized)
        so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess: Any, x: torch.Tensor, batch_size: int) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size].numpy().astype(np.float32)})[0]
                           for i in range(0, len(x), batch_size)])


def check_onnx(path: str | Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
               batch_size: int = 256, threads: int | None = None) -> dict[str, Any]:
    """Compare a QDQ file in ONNX Runtime (default session options) with ``model`` in PyTorch.

    Args:
        path: the exported ``.onnx`` file.
        model: the PyTorch model the file means (for a ``fold_bn`` export:
            ``fold_batchnorm(model, integer_bias=True)``).
        x: inputs (e.g. the run's test set); ``y``: their labels, for accuracies (optional).
        batch_size: inputs per ONNX Runtime call.
        threads: ONNX Runtime intra-op threads (``None``: its default).

    Returns:
        A dict: ``n``, ``argmax_agreement``, ``max_abs_diff``, ``within_output_step`` (fraction of
        samples whose outputs all lie within ``(max - min) / 255`` of PyTorch's), the same three for
        ``reference`` (ONNX Runtime with graph optimization off: what the file computes on any CPU),
        ``accuracy_torch`` / ``accuracy_onnx`` (with ``y``), ``integer_ops`` (fused integer kernels
        in the optimized graph), ``cpu`` (:meth:`CpuFeatures.as_dict`), ``full_range_8bit`` and
        ``warning`` (a sentence naming the fix, or ``None``).
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    x = x.detach().to(torch.float32).cpu()
    with eval_mode(model), torch.no_grad():
        ref = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        out = _run(_session(path, None, threads, opt), x, batch_size)
        ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    base = _run(_session(path, "ORT_DISABLE_ALL", threads, None), x, batch_size)
    step = float(ref.max() - ref.min()) / 255.0

    def compare(o: np.ndarray) -> dict[str, float]:
        d = np.abs(o - ref).reshape(len(ref), -1).max(axis=1)
        r = {"max_abs_diff": float(d.max()), "within_output_step": float(np.mean(d <= step))}
        if ref.ndim == 2:
            r["argmax_agreement"] = float(np.mean(o.argmax(1) == ref.argmax(1)))
        return r

    cpu = cpu_features()
    full8 = full_range_8bit(model)
    integer_ops = {k: v for k, v in sorted(ops.items()) if k in INTEGER_OPS}
    res: dict[str, Any] = {"n": len(x), "onnxruntime": ort.__version__, "output_step": step, **compare(out),
                           "reference": compare(base), "integer_ops": integer_ops, "cpu": cpu.as_dict(),
                           "full_range_8bit": full8, "warning": None}
    if y is not None and ref.ndim == 2:
        yy = y.cpu().numpy()
        res["accuracy_torch"] = float(np.mean(ref.argmax(1) == yy))
        res["accuracy_onnx"] = float(np.mean(out.argmax(1) == yy))
    if full8 and cpu.saturating_u8s8 and integer_ops:
        res["warning"] = (f"this model has full-range 8-bit weights and this CPU ({cpu.name}) sums ONNX "
                          "Runtime's 8-bit integer kernels in saturating 16 bits (no VNNI), so the "
                          f"default session can differ from the model. Fix: {FIX}.")
    return res


def check_run(cfg: Any, model: nn.Module, path: str | Path, fold_bn: bool = False) -> dict[str, Any]:
    """:func:`check_onnx` of a run's exported QDQ file on the run's test set.

    ``cfg`` is the run's :class:`~prunequant.config.RunConfig` (its data section says which test set),
    ``model`` the run's finalized model; with ``fold_bn`` the file means
    ``fold_batchnorm(model, integer_bias=True)``, which is then the PyTorch side.
    """
    from ..config import RESTORATION_DATA
    from ..train.trainer import load_data
    from .fold import fold_batchnorm

    if cfg.data.name in RESTORATION_DATA:
        # image restoration: the file takes one training patch's shape; the inputs are a 4 x 4 grid of
        # crops of that size from each test image
        from ..train.tasks import RESTORATION

        data = RESTORATION.load_data(cfg, lambda m: None)
        p = data.train.patch_size
        crops = []
        for i in range(len(data.test)):
            img = data.test[i][0]
            h, w = img.shape[-2:]
            crops += [img[:, (h - p) * a // 3:(h - p) * a // 3 + p, (w - p) * b // 3:(w - p) * b // 3 + p]
                      for a in range(4) for b in range(4)]
        x, y = torch.stack(crops).float(), None
    else:
        data = load_data(cfg)
        xs, ys = zip(*(data.test[i] for i in range(len(data.test))))
        x, y = torch.stack(list(xs)).float(), torch.as_tensor(ys, dtype=torch.long)
    ref = fold_batchnorm(model, integer_bias=True) if fold_bn else model
    return check_onnx(path, ref, x, y)


def format_check(res: dict[str, Any]) -> str:
    """The readable lines ``prunequant export --check`` prints for a :func:`check_onnx` result."""
    cpu = res["cpu"]

    def line(r: dict[str, Any]) -> str:
        agree = f"argmax agreement {100 * r['argmax_agreement']:.2f} %, " if "argmax_agreement" in r else ""
        return (f"{agree}max abs diff {r['max_abs_diff']:.4g}, within one output step "
                f"{100 * r['within_output_step']:.2f} % of samples")

    ints = ", ".join(f"{k} x{v}" for k, v in res["integer_ops"].items()) or "none (float kernels)"
    lines = [f"check: {res['n']:,} test inputs, ONNX Runtime {res['onnxruntime']} with default settings "
             f"(ORT_ENABLE_ALL) vs PyTorch",
             f"  default:              {line(res)}",
             f"  optimization off:     {line(res['reference'])}",
             f"  integer kernels:      {ints}",
             f"  CPU:                  {cpu['brand'] or '?'} ({cpu['name']}; "
             f"{' '.join(cpu['flags']) or 'no relevant flags'}; via {cpu['source']})"]
    if "accuracy_onnx" in res:
        lines.append(f"  accuracy:             PyTorch {100 * res['accuracy_torch']:.2f} %, "
                     f"ONNX Runtime {100 * res['accuracy_onnx']:.2f} %")
    if res["warning"]:
        lines.append(f"WARNING: {res['warning']}")
    return "\n".join(lines)


__all__ = ["FIX", "INTEGER_OPS", "check_onnx", "check_run", "format_check", "full_range_8bit"]
