"""Helpers for the export tests: real data (scikit-learn digits), small compressed models.

Models are trained for a few dozen steps with the Compressor (layerwise pruning to 50 % and QAT at
the same time, ``ordering: joint``) so that masks are real and quantizers are calibrated, then
finalized and (when :func:`prunequant.graph.shrink` exists) physically shrunk. Each (model, bits)
combination is trained once per test session.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunequant import Compressor
from prunequant.data import load_dataset
from prunequant.models import build_model
from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer

try:
    from prunequant.graph import shrink as _shrink
except ImportError:  # shrink not available: tests use the masked models
    _shrink = None


class ESPCN(nn.Module):
    """ESPCN-like x2 super-resolution net (Shi et al. 2016): conv5-tanh-conv3-tanh-conv3-PixelShuffle."""

    def __init__(self, r: int = 2, c1: int = 16, c2: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.act1 = nn.Tanh()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.act2 = nn.Tanh()
        self.conv3 = nn.Conv2d(c2, r * r, 3, padding=1)
        self.shuffle = nn.PixelShuffle(r)

    def forward(self, x):
        return self.shuffle(self.conv3(self.act2(self.conv2(self.act1(self.conv1(x))))))


@functools.lru_cache(maxsize=1)
def _digits() -> dict[str, torch.Tensor]:
    b = load_dataset("digits")

    def stack(ds):
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(xs).float(), torch.as_tensor(ys, dtype=torch.long)

    xtr, ytr = stack(b.train)
    xva, yva = stack(b.val)
    xte, yte = stack(b.test)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte,
            "x_all": torch.cat([xtr, xva, xte]), "y_all": torch.cat([ytr, yva, yte])}


def sr_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-res 4x4 input, high-res 8x8 target) for the x2 super-resolution model."""
    return F.avg_pool2d(x, 2), x


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "espcn":
        return ESPCN()
    return build_model(name, num_classes=10, in_channels=1, image_size=8, width=0.25)


def recipe(name: str, wb: int, ab: int, weight_range: str = "full") -> dict:
    r = {
        "ordering": "joint",
        "prune": {"sparsity": 0.5, "unit": "steps", "start": 4, "interval": 1, "refresh": 1},
        "quant": {"weight_bits": wb, "act_bits": ab, "unit": "steps", "weight_delay": 0, "act_delay": 0,
                  "weight_range": weight_range, "first_last_bits": None},
    }
    if name == "espcn":  # as in the paper's generators: image input unquantized, last conv at 8 bits
        r["quant"]["per_layer"] = {"conv1": {"weight_bits": wb, "act_bits": None},
                                   "conv3": {"weight_bits": 8, "act_bits": 8}}
    return r


#: Models whose QAT run is done once at W8A8; other bit-widths are derived with :func:`rebit`
#: (MobileNetV2 has 18 sites, so its layerwise schedule alone takes ~40 steps: too slow to repeat).
DERIVED = {"mobilenetv2"}


def rebit(model: nn.Module, wb: int, ab: int) -> nn.Module:
    """A copy of a calibrated model with other bit-widths, calibrated as a ``wb``/``ab`` run would be.

    The weight quantizer's statistic is the running mean of ``max|W_c| / 2**(b-1)``, so changing
    ``b`` rescales it by ``2**(b_old - b)``; activation bounds do not depend on ``b``.
    """
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, WeightQuantizer):
            mod.stat_sum.mul_(2.0 ** (mod.bits - wb))
            mod.bits = wb
        elif isinstance(mod, ActQuantizer):
            mod.bits = ab
    m.pq_plan = copy.deepcopy(model.pq_plan)
    for info in m.pq_plan.layers.values():
        info.weight_bits = wb if info.weight_bits is not None else None
        info.act_bits = ab if info.act_bits is not None else None
    opts = getattr(m.pq_plan, "options", None)
    if opts:
        opts.update(weight_bits=wb, act_bits=ab)
    for attr in ("pq_original_class", "pq_leaves"):
        if hasattr(model, attr):
            setattr(m, attr, getattr(model, attr))
    return m


@functools.cache
def compressed(name: str, wb: int, ab: int, weight_range: str = "full"):
    """``(finalized masked model, shrunk model or None, example input)`` trained on digits
    (``weight_range``: the recipe's ``quant.weight_range``, applied during QAT)."""
    if name in DERIVED and (wb, ab) != (8, 8):
        assert weight_range == "full", "derived models are full range"
        fm8, _, ex = compressed(name, 8, 8)
        fm = rebit(fm8, wb, ab)
        return fm, (_shrink(fm) if _shrink is not None else None), ex
    d = _digits()
    x, y = d["x_train"], d["y_train"]
    if name == "espcn":
        x, y = sr_pair(x)
    model = make_model(name)
    comp = Compressor(model, recipe(name, wb, ab, weight_range), x[:8])
    net = comp.model
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(comp.total_steps_hint + 4):
        idx = torch.randint(0, len(x), (24,), generator=g)
        out = net(x[idx])
        loss = F.mse_loss(out, y[idx]) if name == "espcn" else F.cross_entropy(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.step()
    try:
        fm = comp.finalize(shrink=False)  # the masked model; shrunk below
    except TypeError:  # finalize() without the shrink argument returns the masked model
        fm = comp.finalize()
    small = _shrink(fm) if _shrink is not None else None
    if small is not None:
        small.eval()
    return fm, small, x[:4]


def eval_inputs(name: str) -> torch.Tensor:
    x = _digits()["x_all"]
    return sr_pair(x)[0] if name == "espcn" else x


def deployable(name: str, wb: int, ab: int, weight_range: str = "full"):
    """The model to export: shrunk when shrink exists, else the masked one."""
    # full range: the same cache entry as compressed(name, wb, ab) (each model is trained once)
    args = (name, wb, ab) if weight_range == "full" else (name, wb, ab, weight_range)
    fm, small, ex = compressed(*args)
    return (small if small is not None else fm), ex


def out_step(ref: np.ndarray) -> float:
    """One step of an 8-bit quantization of the output range (the tolerance of the round trips)."""
    return float(ref.max() - ref.min()) / 255.0


def ort_run(path, x: np.ndarray, fused: bool = False) -> np.ndarray:
    """ONNX Runtime's output for ``x``: by default with graph optimization off (``ORT_DISABLE_ALL``,
    float kernels), the file's meaning on every CPU; ``fused=True``: the default ``ORT_ENABLE_ALL``,
    which fuses Q/DQ into integer kernels whose arithmetic depends on the CPU (export/cpu.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if not fused:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = path.SerializeToString() if hasattr(path, "SerializeToString") else str(path)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.astype(np.float32)})[0]


def deviation(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Per-sample worst deviation summarized: share within one output step, median, argmax agreement."""
    worst = np.abs(out - ref).reshape(len(ref), -1).max(axis=1)
    r = {"within_step": float(np.mean(worst <= out_step(ref))), "median": float(np.median(worst)),
         "max": float(worst.max())}
    if ref.ndim == 2:
        r["argmax"] = float(np.mean(out.argmax(1) == ref.argmax(1)))
    return r


def torch_run(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x).numpy()
