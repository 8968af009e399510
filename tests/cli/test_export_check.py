"""``prunequant export RUN --check``: the exported QDQ file in ONNX Runtime (default settings, this CPU)
against PyTorch on the run's test set, with the CPU's features and the saturation warning."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("onnxruntime")

from prunequant.cli import main  # noqa: E402
from prunequant.export.cpu import cpu_features  # noqa: E402


@pytest.fixture(scope="module")
def w8a8_run(tmp_path_factory) -> Path:
    """A tiny finished W8A8 run (full-range weights) on the scikit-learn digits."""
    tmp = tmp_path_factory.mktemp("check")
    cfg = {
        "model": {"name": "resnet20", "width": 0.25},
        "data": {"name": "digits", "batch_size": 64},
        "train": {"dense_epochs": 1, "epochs": 3, "lr": 0.05, "compress_lr": 0.02, "progress": False,
                  "threads": 1},
        "recipe": {
            "prune": {"sparsity": 0.5, "unit": "steps", "start": 2, "interval": 3, "refresh": 1},
            "quant": {"weight_bits": 8, "act_bits": 8, "unit": "steps", "weight_delay": 2, "act_delay": 1},
        },
    }
    (tmp / "r.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(tmp / "r.yaml"), "--out", str(tmp / "run"), "--no-progress"]) == 0
    return tmp / "run"


@pytest.mark.parametrize("fold", [False, True])
def test_export_check_prints_agreement_cpu_and_warning(w8a8_run, capsys, fold):
    capsys.readouterr()
    args = ["export", str(w8a8_run), "--check", "--output", str(w8a8_run / f"c{int(fold)}.onnx")]
    assert main(args + (["--fold-bn"] if fold else [])) == 0
    out = capsys.readouterr().out
    cpu = cpu_features()
    assert "argmax agreement" in out and "max abs diff" in out and "optimization off" in out
    assert cpu.name in out and "accuracy:" in out
    # the file's meaning (optimization off) agrees with PyTorch on the test set on any CPU
    off = next(line for line in out.splitlines() if "optimization off" in line)
    agree = float(off.split("argmax agreement ")[1].split(" %")[0])
    assert agree >= 99.0, out
    if cpu.saturating_u8s8:  # full-range 8-bit weights meet saturating kernels: the fix is named
        assert "WARNING" in out and "weight_range: reduced" in out, out
    else:
        assert "WARNING" not in out, out


def test_export_check_needs_qdq(w8a8_run, capsys):
    assert main(["export", str(w8a8_run), "--format", "qonnx", "--check",
                 "--output", str(w8a8_run / "q.onnx")]) == 2
    assert "--format qdq" in capsys.readouterr().err
