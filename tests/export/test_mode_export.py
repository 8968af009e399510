"""ONNX export computes eval-mode behaviour: dropouts and stochastic depth are identities (issue 11).

Oracle: the original model in eval mode, against ONNX Runtime with graph optimizations off. The
models are quantized at 16 bits, so the quantization error is far below the tolerance, while a
dropout or stochastic depth left active would be far above it (checked on train-mode outputs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

GRAPH_TESTS = Path(__file__).resolve().parent.parent / "graph"
sys.path.insert(0, str(GRAPH_TESTS))

from gtools import calibrate  # noqa: E402
from tvshim import import_torchvision  # noqa: E402

from prunequant.export import ExportError, build_onnx  # noqa: E402
from prunequant.graph import instrument, shrink  # noqa: E402

tv = import_torchvision()


class Drops(nn.Module):
    """Functional dropouts with training=self.training, stochastic depth (module and function)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.sd = tv.ops.StochasticDepth(0.5, "row")
        self.c3 = nn.Conv2d(16, 16, 1)
        self.adrop = nn.AlphaDropout(0.2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.c1(x)))
        x = F.dropout(x, 0.5, self.training)
        y = F.relu(self.bn2(self.c2(x)))
        y = F.dropout2d(y, 0.3, training=self.training)
        x = x + self.sd(y)
        x = tv.ops.stochastic_depth(x, 0.4, "batch", self.training)
        x = F.relu(self.c3(x))
        x = F.alpha_dropout(x, 0.2, self.training)
        x = F.feature_alpha_dropout(x, 0.2, self.training)
        x = F.dropout1d(x.flatten(2), 0.3, self.training).mean(2)
        return self.fc(self.adrop(x))


class AlwaysDrops(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(F.relu(self.c1(x)), 0.5)  # training defaults to True: drops in eval mode too
        return self.fc(x.mean([2, 3]))


def _ort(proto, x: Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def _export(model: nn.Module, shape: tuple[int, ...]):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    gm, _ = instrument(model, prune_stat="none", weight_bits=16, act_bits=16, example_input=x)
    calibrate(gm, shape)  # train-mode passes: the quantizers see dropped activations too
    small = shrink(gm).eval()
    return build_onnx(small, x, "qdq"), x


@pytest.mark.parametrize("name", ["drops", "efficientnet_b0"])
def test_export_computes_eval_mode(name: str) -> None:
    from zoo import randomize

    torch.manual_seed(0)
    if name == "drops":
        model, shape = randomize(Drops()), (4, 3, 8, 8)
    else:
        model, shape = randomize(tv.models.efficientnet_b0(weights=None)), (2, 3, 64, 64)
    model.train()  # traced in train mode: the export must still be the eval-mode network
    proto, x = _export(model, shape)
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Dropout", "RandomUniform", "RandomUniformLike", "Bernoulli", "RandomNormalLike"}
    out = _ort(proto, x)
    with torch.no_grad():
        ref = model.eval()(x).numpy()
        model.train()
        torch.manual_seed(1)
        drop = model(x).numpy()
    scale = float(np.abs(ref).max())
    err = float(np.abs(out - ref).max())
    assert err <= 1e-3 * scale, (err, scale)
    assert float(np.abs(drop - ref).max()) > 50 * err  # an active dropout would be seen


def test_dropout_active_in_eval_mode_is_refused() -> None:
    with pytest.raises(ExportError, match=r"dropout with training=True: active in eval mode"):
        _export(AlwaysDrops(), (2, 3, 8, 8))
