"""The command line: bad input gives one clear message (field + allowed values), no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prunequant.cli import build_config, main
from prunequant.config import RunConfig, default_config


def _run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prunequant.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )


def _write(tmp_path: Path, data: dict) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.mark.parametrize(
    ("data", "field", "allowed"),
    [
        ({"recipe": {"prune": {"sparsity": 1.5}}}, "recipe.prune.sparsity", "less than 1"),
        ({"recipe": {"quant": {"weight_bits": 1}}}, "recipe.quant.weight_bits", "greater than or equal to 2"),
        ({"recipe": {"quant": {"act_bits": 17}}}, "recipe.quant.act_bits", "less than or equal to 16"),
        ({"recipe": {"prune": {"importance": "foo"}}}, "recipe.prune.importance", "'a_l1'"),
        ({"recipe": {"prune": {"shedule": "layerwise"}}}, "recipe.prune.shedule", "unknown field"),
        ({"model": {"name": "resnet99"}}, "model.name", "'resnet20'"),
    ],
)
def test_bad_recipe_one_clear_message(tmp_path: Path, data: dict, field: str, allowed: str) -> None:
    r = _run_cli(["run", "--config", _write(tmp_path, data), "--out", str(tmp_path / "o")], tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert field in r.stderr and allowed in r.stderr, r.stderr
    assert not (tmp_path / "o" / "report.json").exists()


def test_missing_dataset_path(tmp_path: Path) -> None:
    cfg = {"data": {"name": "cifar10", "root": str(tmp_path / "nowhere")}}
    r = _run_cli(["run", "--config", _write(tmp_path, cfg)], tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "cifar10" in r.stderr.lower().replace("-", "") and "nowhere" in r.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    r = _run_cli(["run", "--config", str(tmp_path / "nope.yaml")], tmp_path)
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr


def test_set_overrides_and_validation() -> None:
    cfg = build_config(None, ["recipe.prune.sparsity=0.75", "model.width=0.5"])
    assert cfg.recipe.prune.sparsity == 0.75 and cfg.model.width == 0.5
    assert main(["run", "--set", "recipe.prune.sparsity=2"]) == 2


def test_config_round_trip_keeps_per_layer_inheritance() -> None:
    """A ``conv1: {act_bits: 8}`` entry must not turn into float weights on a round trip."""
    cfg = build_config(None, ["recipe.quant.per_layer={conv1: {act_bits: 8}}"])
    assert cfg.recipe.quant.per_layer["conv1"].model_dump(exclude_unset=True) == {"act_bits": 8}
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.recipe.quant.per_layer["conv1"].model_dump(exclude_unset=True) == {"act_bits": 8}
    explicit = RunConfig.from_dict({"recipe": {"quant": {"per_layer": {"fc": {"weight_bits": None}}}}})
    assert RunConfig.from_dict(explicit.to_dict()).recipe.quant.per_layer["fc"].model_dump(
        exclude_unset=True) == {"weight_bits": None}


def test_default_config_is_the_documented_one() -> None:
    cfg = default_config()
    assert cfg.model.name == "resnet20" and cfg.data.name == "fashion_mnist"
    assert cfg.recipe.prune.schedule == "layerwise" and cfg.recipe.prune.importance == "a_l1"
    assert cfg.recipe.quant.weight_bits == 4 and cfg.recipe.quant.act_bits == 4


def test_one_set_of_defaults_whatever_the_entry_point(tmp_path: Path) -> None:
    """No --config, an empty YAML, a partial YAML, a dict and the listed default.yaml all agree."""
    from importlib.resources import files

    import yaml

    listed = yaml.safe_load(files("prunequant").joinpath("recipes/default.yaml").read_text())
    base = default_config().to_dict()
    assert RunConfig.from_dict(listed).to_dict() == base == RunConfig().to_dict()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert build_config(str(empty), []).to_dict() == build_config(None, []).to_dict() == base
    partial = tmp_path / "partial.yaml"
    partial.write_text("model: {name: vgg_small}\nrecipe: {prune: {sparsity: 0.75}}\n")
    got = build_config(str(partial), []).to_dict()
    assert got["model"]["name"] == "vgg_small" and got["recipe"]["prune"]["sparsity"] == 0.75
    got["model"]["name"], got["recipe"]["prune"]["sparsity"] = "resnet20", 0.5
    assert got == base  # everything it does not name is the default run's


def test_cli_run_end_to_end_on_digits(tmp_path: Path) -> None:
    """A real (small) run through the CLI writes the report files with the documented schema."""
    cfg = {
        "model": {"name": "resnet20", "width": 0.25},
        "data": {"name": "digits", "batch_size": 64},
        "train": {"dense_epochs": 2, "epochs": 3, "lr": 0.05, "compress_lr": 0.02, "progress": False,
                  "threads": 1},
        "recipe": {
            "prune": {"sparsity": 0.5, "unit": "steps", "start": 2, "interval": 3, "refresh": 1},
            "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 2, "act_delay": 1},
        },
    }
    out = tmp_path / "run"
    r = _run_cli(["run", "--config", _write(tmp_path, cfg), "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema_version"] == 1
    for phase in ("dense", "pruned", "final"):
        for key in ("accuracy", "params", "macs", "bops", "memory_mbit", "density"):
            assert key in rep["phases"][phase], (phase, key)
    assert rep["phases"]["final"]["memory_mbit"] < rep["phases"]["pruned"]["memory_mbit"]
    assert rep["phases"]["pruned"]["macs"] < rep["phases"]["dense"]["macs"]
    assert rep["layers"] and all(
        lay["channels_after"] == lay["channels_before"] - int(0.5 * lay["channels_before"])
        for lay in rep["layers"]
    )
    summary = (out / "summary.md").read_text()
    assert "pruned + quantized" in summary and "dense FP32" in summary
    final = json.loads((out / "report.json").read_text())["phases"]["final"]
    assert final["deploy_weight_mbit"] > final["weight_mbit"] > 0
    assert f"{final['deploy_weight_mbit']:.3f} Mbit" in summary
    for png in ("channels.png", "accuracy_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Export the finished run in every format; the QDQ file runs in ONNX Runtime.
    for fmt, name in (("qdq", "model.qdq.onnx"), ("qonnx", "model.qonnx.onnx"), ("packed", "model.pqpack")):
        e = _run_cli(["export", str(out), "--format", fmt], tmp_path)
        assert e.returncode == 0, e.stderr
        assert (out / name).stat().st_size > 0
        if fmt == "packed":  # the plain file keeps BatchNorm whole; the output says how to fold it
            assert "scales and biases" in e.stdout and "--fold-bn" in e.stdout
    # The folded packed form is smaller; QONNX refuses --fold-bn with a message, not a traceback.
    f = _run_cli(["export", str(out), "--format", "packed", "--fold-bn", "--output", str(out / "f.pqpack")],
                 tmp_path)
    assert f.returncode == 0, f.stderr
    assert "weight memory (measure)" in f.stdout and "--fold-bn" not in f.stdout
    assert (out / "f.pqpack").stat().st_size < (out / "model.pqpack").stat().st_size
    q = _run_cli(["export", str(out), "--format", "qonnx", "--fold-bn"], tmp_path)
    assert q.returncode == 2 and "fold_bn" in q.stderr and "Traceback" not in q.stderr
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.qdq.onnx"), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.zeros((2, 1, 8, 8), dtype=np.float32)}
    assert sess.run(None, feed)[0].shape == (2, 10)


def test_export_refuses_a_folder_without_a_run(tmp_path: Path) -> None:
    r = _run_cli(["export", str(tmp_path)], tmp_path)
    assert r.returncode == 2 and "no report.json" in r.stderr and "Traceback" not in r.stderr


def test_python_dash_m() -> None:
    """``python -m prunequant`` is the CLI (what ``torchrun -m prunequant`` starts on every rank)."""
    r = subprocess.run([sys.executable, "-m", "prunequant", "--version"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0 and r.stdout.startswith("prunequant ")
