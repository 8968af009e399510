"""One pipeline for every task: `prunequant run` trains, compresses, evaluates and reports image
restoration (ESPCN x3 super-resolution, the U-Net denoiser) through the classification trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from prunequant.cli import main
from prunequant.config import RunConfig
from prunequant.train.tasks import CLASSIFICATION, RESTORATION, task_for


def fails(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The CLI exits with 2 and prints one error message (no traceback) containing every needle."""
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("error:") == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


SCHEDULE = {"prune": {"sparsity": 0.5, "start": 0.25, "interval": 0.5, "refresh": 0.25},
            "quant": {"weight_bits": 8, "act_bits": 8, "weight_delay": 0.25, "act_delay": 0.25,
                      "per_layer": {"conv1": {"act_bits": None}}}}
TRAIN = {"dense_epochs": 3, "epochs": 4, "lr": 0.003, "compress_lr": 0.001, "optimizer": "adam",
         "weight_decay": 0.0, "seed": 0, "threads": 1, "progress": False, "checkpoint_minutes": None}


def _untrained_psnr(cfg: RunConfig) -> float:
    data = RESTORATION.load_data(cfg, print)
    torch.manual_seed(cfg.train.seed)
    model = RESTORATION.build_model(cfg, data)
    return RESTORATION.evaluate(model, data.test, torch.device("cpu"), data.border)["psnr"]


def _run(tmp_path: Path, cfg: dict) -> tuple[dict, Path]:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", "--config", str(p), "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "report.json").read_text()), out


def _check_report(rep: dict, out: Path, untrained: float) -> None:
    assert rep["task"] == {"name": "restoration", "metric": "psnr", "higher_is_better": True,
                           "label": rep["task"]["label"]}
    assert set(rep["phases"]) >= {"dense", "pruned", "final"}
    for ph in rep["phases"].values():
        for k in ("psnr", "ssim", "val_psnr", "params", "macs", "bops", "memory_mbit"):
            assert isinstance(ph[k], (int, float)), k
        assert "accuracy" not in ph and 0 < ph["ssim"] <= 1
    dense, final = rep["phases"]["dense"], rep["phases"]["final"]
    assert final["params"] < dense["params"] and final["memory_mbit"] < dense["memory_mbit"] / 4
    assert final["weight_bits"] == [8]
    # training helped: after training (dense) and after compression (final) above the untrained model
    assert dense["psnr"] > untrained + 3 and final["psnr"] > untrained + 3, (untrained, dense, final)
    sc = rep["shrink_check"]
    assert sc["shrunk"] and sc["samples"] == 3
    assert sc["max_abs_diff"] < 0.02 and sc["min_psnr_between"] > 60, sc
    assert rep["reference"]["psnr"] > 20 and rep["figures"] == ["restoration.png"]
    assert (out / "restoration.png").stat().st_size > 1000
    assert (out / "accuracy_memory.png").is_file() and (out / "model" / "weights.pt").is_file()
    summary = (out / "summary.md").read_text()
    assert "PSNR" in summary and "(reference)" in summary and "restoration.png" in summary


ESPCN = {"model": {"name": "espcn", "width": 0.5},
         "data": {"name": "sr_images", "scale": 3, "patch_size": 12, "patches_per_epoch": 64,
                  "batch_size": 16},
         "train": TRAIN, "recipe": SCHEDULE}


@pytest.fixture(scope="module")
def espcn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return _run(tmp_path_factory.mktemp("espcn"), ESPCN)


def test_espcn_x3_end_to_end(espcn_run: tuple[dict, Path]) -> None:
    rep, out = espcn_run
    _check_report(rep, out, _untrained_psnr(RunConfig.from_dict(ESPCN)))
    assert rep["reference"]["name"] == "bicubic x3" and rep["data"]["input_shape"] == [1, 12, 12]
    assert [r["channels_after"] for r in rep["layers"]] == [16, 8]


def test_unet_denoise_end_to_end(tmp_path: Path) -> None:
    cfg = {"model": {"name": "unet_denoise", "width": 0.25},
           "data": {"name": "denoise_images", "patch_size": 32, "patches_per_epoch": 64, "batch_size": 16},
           "train": {**TRAIN, "epochs": 10},  # 12 layers pruned 2 steps apart, then QAT
           "recipe": {"prune": {"sparsity": 0.5, "unit": "steps", "start": 1, "interval": 1, "refresh": 1},
                      "quant": {**SCHEDULE["quant"], "unit": "steps", "weight_delay": 2, "act_delay": 1,
                                "per_layer": {"downs.0.0": {"act_bits": None}}}}}
    rep, out = _run(tmp_path, cfg)
    _check_report(rep, out, _untrained_psnr(RunConfig.from_dict(cfg)))
    assert rep["reference"]["name"] == "noisy input" and rep["data"]["input_shape"] == [3, 32, 32]


def test_task_for() -> None:
    assert task_for(RunConfig()) is CLASSIFICATION
    assert task_for(RunConfig.from_dict({"model": {"name": "fsrcnn"}, "data": {"name": "sr_images"}})) \
        is RESTORATION


@pytest.mark.parametrize(("sets", "needles"), [
    (["model.name=espcn"], ["model.name=espcn does not fit data.name=fashion_mnist", "data.name=sr_images"]),
    (["data.name=sr_images"], ["model.name=resnet20 does not fit data.name=sr_images", "espcn or fsrcnn"]),
    (["model.name=espcn", "data.name=denoise_images"],
     ["model.name=espcn does not fit data.name=denoise_images", "unet_denoise"]),
    (["data.scale=2"], ["data.scale=2 is read only with data.name=sr_images, not data.name=fashion_mnist"]),
    (["model.name=unet_denoise", "data.name=denoise_images", "data.scale=3"], ["data.scale=3"]),
    (["model.name=espcn", "data.name=sr_images", "data.scale=4"], ["data.scale", "2 or 3"]),
])
def test_a_model_that_does_not_fit_the_data_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         sets: list[str], needles: list[str]) -> None:
    out = tmp_path / "o"
    args = ["run", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    fails(args, capsys, *needles)
    assert not out.exists()


def test_denoise_patch_not_a_multiple_of_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    fails(["run", "--out", str(out), "--set", "model.name=unet_denoise", "--set", "data.name=denoise_images",
           "--set", "data.patch_size=30"], capsys, "data.patch_size=30", "multiple of 4")
    assert not out.exists()


def test_espcn_export_qdq_matches_pytorch_in_onnx_runtime(espcn_run: tuple[dict, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`prunequant export RUN --format qdq --check` of the ESPCN run (PixelShuffle -> DepthToSpace CRD):
    ONNX Runtime computes the smaller W8A8 model's output on crops of the test images."""
    pytest.importorskip("onnxruntime")
    from prunequant.export.check import check_run
    from prunequant.graph.persist import load_pruned
    from prunequant.models import build_restoration_model

    rep, out = espcn_run
    capsys.readouterr()
    assert main(["export", str(out), "--format", "qdq", "--check"]) == 0
    printed = capsys.readouterr().out
    assert "check: 48 test inputs" in printed, printed
    cfg = RunConfig.from_dict(rep["config"])
    x = torch.zeros(1, *rep["data"]["input_shape"])
    model = load_pruned(build_restoration_model("espcn", 1, 3, 0.5), out / "model", x).eval()
    res = check_run(cfg, model, out / "model.qdq.onnx")
    assert res["n"] == 48 and "argmax_agreement" not in res
    # graph optimization off: what the file computes on any CPU, within one 8-bit output step
    assert res["reference"]["within_output_step"] == 1.0, res
    assert res["reference"]["max_abs_diff"] < 0.01, res


def test_analyze_refuses_a_restoration_run(espcn_run: tuple[dict, Path], capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    _, out = espcn_run
    fails(["analyze", str(out)], capsys, "data.name=sr_images is image restoration",
          "classification runs only")
    assert not (out / "analysis").exists()


class _EpochPatches(torch.utils.data.Dataset):
    """Item i of epoch e is (e, i): which patches a batch saw."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([self.epoch, i]), torch.tensor(0)


def test_patch_epochs_follow_the_stream_and_its_resume() -> None:
    """Each epoch of the batch stream draws its own patches (set_epoch), and a stream continued from a
    saved position sees the same patches as the uninterrupted one."""
    from prunequant.train.trainer import _BatchStream

    a = _BatchStream(_EpochPatches(), 4, seed=0)
    seen = [next(a)[0] for _ in range(5)]  # 2 batches per epoch: epochs 0, 0, 1, 1, 2
    assert [int(b[0, 0]) for b in seen] == [0, 0, 1, 1, 2]
    tensors, pos = a.position()
    b = _BatchStream(_EpochPatches(), 4, seed=0)
    b.seek(tensors, pos)
    for _ in range(4):
        assert torch.equal(next(a)[0], next(b)[0])
    a.restart()
    assert int(next(a)[0][0, 0]) == 0
