"""Every bad input the CLI reads or writes: one message on stderr, exit code 2, nothing lost.

One small finished run folder is made per session (``finished_run``) and copied for each test, which
then damages one file the way a user or a disk could and checks that ``prunequant.cli.main``
returns 2 with one ``error:`` message naming the file or field, that no file changed, and that a
pickle payload never ran (its ``__reduce__`` would create a sentinel file). docs/errors.md lists
these cases with the messages they print.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from clitools import fails as _fails

from prunequant.cli import main
from prunequant.graph.persist import record_digest
from prunequant.models import build_model
from prunequant.recipe import RecipeError

TINY = {
    "model": {"name": "resnet20", "width": 0.25},
    "data": {"name": "digits", "batch_size": 64, "train_subset": 256, "test_subset": 128},
    "train": {"dense_epochs": 1, "epochs": 8, "lr": 0.05, "compress_lr": 0.02, "progress": False,
              "threads": 1},
    "recipe": {
        "prune": {"sparsity": 0.5, "unit": "steps", "start": 1, "interval": 1, "refresh": 1},
        "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 1, "act_delay": 1},
    },
}
RUN_FILES = ["config.json", "dense.pt", "manifest.json", "masked.pt", "model/pruning.json",
             "model/weights.pt", "report.json"]


class Payload:
    """Pickles to a call of ``open(sentinel, "w")``: loading it would create the sentinel file."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _umask(mask: int) -> int:
    return os.umask(mask)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (ResNet-20 x0.25 on 256 digits), written under umask 0o022."""
    root = tmp_path_factory.mktemp("finished")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    old = _umask(0o022)
    try:
        rc = main(["run", "--config", str(cfg), "--out", str(root / "run"), "--no-progress"])
    finally:
        os.umask(old)
    assert rc == 0
    return root / "run"


@pytest.fixture
def run_dir(finished_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    yield p


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).digest(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _reseal(run: Path) -> None:
    """Recompute every checksum, as someone editing files on purpose could: deeper checks must hold."""
    rec_path = run / "model" / "pruning.json"
    rec = json.loads(rec_path.read_text())
    rec["sha256"] = hashlib.sha256((run / "model" / "weights.pt").read_bytes()).hexdigest()
    rec["record_sha256"] = record_digest(rec)
    rec_path.write_text(json.dumps(rec))
    man = json.loads((run / "manifest.json").read_text())
    for name in man["files"]:
        data = (run / name).read_bytes()
        man["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (run / "manifest.json").write_text(json.dumps(man))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


# ------------------------------------------------------------------------------------------- a good run
def test_finished_run_is_complete_and_honours_the_umask(finished_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    man = json.loads((finished_run / "manifest.json").read_text())
    assert sorted(man["files"]) == sorted(set(RUN_FILES) - {"manifest.json"})
    for f in finished_run.rglob("*"):
        if f.is_file():  # written under umask 0o022, as open() would: 0o644, not mkstemp's 0o600
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    old = _umask(0o077)
    try:
        assert main(["export", str(run), "--format", "packed"]) == 0
        assert main(["export", str(run), "--format", "qdq"]) == 0
    finally:
        os.umask(old)
    for name in ("model.pqpack", "model.qdq.onnx"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o600, name


def test_run_from_dense_checkpoint_checks_it_and_honours_a_private_umask(
        finished_run: Path, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    old = _umask(0o077)
    try:
        rc = main(["run", "--config", str(config), "--out", str(out), "--no-progress",
                   "--set", f"train.dense_checkpoint={finished_run / 'dense.pt'}"])
    finally:
        os.umask(old)
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert "dense.pt" not in man["files"] and "report.json" in man["files"]  # it wrote no dense.pt
    # Same dense weights, same seed: the same compressed model, bit for bit.
    a = torch.load(out / "masked.pt", weights_only=True)
    b = torch.load(finished_run / "masked.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in out.rglob("*"):
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_rerun_into_its_own_folder_keeps_dense_pt_usable(run_dir: Path, config: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--out RUN --overwrite with RUN/dense.pt as the checkpoint: dense.pt stays listed, checked and
    reusable (without --overwrite the folder, which holds a run, is refused)."""
    args = ["run", "--config", str(config), "--out", str(run_dir), "--no-progress",
            "--set", f"train.dense_checkpoint={run_dir / 'dense.pt'}"]
    before = _snapshot(run_dir)
    _fails(args, capsys, f"--out {run_dir}: holds a finished run", "--overwrite", "nothing was written")
    assert _snapshot(run_dir) == before
    (run_dir / "model.pqpack").write_bytes(b"an export of the earlier run")
    (run_dir / "notes.txt").write_text("mine\n")
    assert main([*args, "--overwrite"]) == 0
    man = json.loads((run_dir / "manifest.json").read_text())
    assert sorted(man["files"]) == sorted(set(RUN_FILES) - {"manifest.json"})
    assert not (run_dir / "model.pqpack").exists()  # the earlier run's export went with it
    assert (run_dir / "notes.txt").read_text() == "mine\n"  # not a run's file: kept
    assert main(["export", str(run_dir), "--format", "packed"]) == 0


# ------------------------------------------------------------------------------------------- run --out
def test_out_is_an_existing_file(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("precious\n")
    before = _snapshot(tmp_path)
    _fails(["run", "--config", str(config), "--out", str(target)], capsys,
           f"--out {target}: is an existing file", "did you mean --out", "untouched")
    assert _snapshot(tmp_path) == before


def test_out_is_a_yaml_file_suggests_config(tmp_path: Path, config: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(tmp_path)
    _fails(["run", "--out", str(config)], capsys, "is an existing file", f"did you mean --config {config}")
    assert _snapshot(tmp_path) == before


def test_out_under_a_file(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    before = _snapshot(tmp_path)
    _fails(["run", "--config", str(config), "--out", str(tmp_path / "f" / "sub")], capsys,
           "is a file, so no folder can be made under it")
    assert _snapshot(tmp_path) == before


def test_out_holds_foreign_files(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder with a report.json that no prunequant run wrote is not overwritten."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.json").write_text("my own report\n")
    before = _snapshot(tmp_path)
    _fails(["run", "--config", str(config), "--out", str(tmp_path / "mine")], capsys,
           "holds report.json, which no prunequant run wrote",
           "nothing was written")
    assert _snapshot(tmp_path) == before


def test_out_may_not_be_an_older_run_folder(tmp_path: Path) -> None:
    """A folder an older prunequant wrote (report.json of a run, no manifest) is a run's folder: refused
    without --overwrite, which replaces it; a report.json that is no run's is foreign either way."""
    from prunequant.runfolder import check_out_dir, clear_run
    from prunequant.utils import atomic_write_json

    old = tmp_path / "old"
    atomic_write_json(old / "report.json", {"schema_version": 1, "prunequant_version": "0.1.0"})
    (old / "dense.pt").write_bytes(b"")
    with pytest.raises(RecipeError, match="holds a run of an older prunequant .* replace it with --overwrite"
                       ):
        check_out_dir(old)
    assert check_out_dir(old, overwrite=True) == old
    with pytest.raises(RecipeError, match="cannot be resumed"):
        check_out_dir(old, resume=True)
    (old / "manifest.json").write_text("{}")
    assert clear_run(old)[0] == "manifest.json"  # first: an interruption leaves no folder claiming the run
    assert not any(old.iterdir())
    atomic_write_json(old / "report.json", {"schema_version": 1, "prunequant_version": "0.1.0"})
    (old / "report.json").write_text('{"schema_version": 1')  # not a report: refused
    for overwrite in (False, True):
        with pytest.raises(RecipeError, match="no prunequant run wrote"):
            check_out_dir(old, overwrite=overwrite)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["run", "--config", str(config), "--out", str(tmp_path / "o"), "--set", "train.device=cuda"],
           capsys, "train.device", "no usable CUDA device", "cpu or auto")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ run: dense checkpoint
def _dense(tmp_path: Path, config: Path, ckpt: Path | str, capsys: pytest.CaptureFixture[str],
           *needles: str) -> str:
    before = _snapshot(tmp_path)
    err = _fails(["run", "--config", str(config), "--out", str(tmp_path / "o"),
                  "--set", f"train.dense_checkpoint={ckpt}"], capsys, "train.dense_checkpoint", *needles)
    assert not (tmp_path / "o").exists()  # refused before anything was written
    assert _snapshot(tmp_path) == before
    return err


def test_dense_checkpoint_missing(tmp_path: Path, config: Path, run_dir: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _dense(tmp_path, config, tmp_path / "nope.pt", capsys, "file not found", "nope.pt")
    _dense(tmp_path, config, run_dir / "dens.pt", capsys, "file not found",
           f"did you mean {run_dir / 'dense.pt'}?")


def test_dense_checkpoint_is_a_folder(tmp_path: Path, config: Path, run_dir: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _dense(tmp_path, config, tmp_path / "run" / "model", capsys, "is not a file")
    _dense(tmp_path, config, run_dir, capsys, "is not a file", f"did you mean {run_dir / 'dense.pt'}?")


def test_dense_checkpoint_other_architecture(tmp_path: Path, config: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(build_model("resnet32", num_classes=10, in_channels=1, image_size=8, width=0.25).state_dict(),
               tmp_path / "r32.pt")
    _dense(tmp_path, config, tmp_path / "r32.pt", capsys, "does not fit model.name=resnet20",
           "unexpected (e.g. 'layer1.3.", "same model and data")
    torch.save(build_model("resnet20", num_classes=10, in_channels=1, image_size=8, width=0.5).state_dict(),
               tmp_path / "wide.pt")
    _dense(tmp_path, config, tmp_path / "wide.pt", capsys, "model.width=0.25", "of another shape",
           "'conv1.weight': [8, 1, 3, 3] in the file, [4, 1, 3, 3] in the model")


def test_dense_checkpoint_pickle_never_runs(tmp_path: Path, config: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "PWNED"
    torch.save({"conv1.weight": Payload(sentinel)}, tmp_path / "evil.pt", pickle_module=pickle)
    _dense(tmp_path, config, tmp_path / "evil.pt", capsys, "holds Python objects", "refused")
    assert not sentinel.exists()


@pytest.mark.parametrize("form", ["truncated", "empty", "text", "list"])
def test_dense_checkpoint_not_a_state_dict(tmp_path: Path, config: Path, finished_run: Path,
                                           capsys: pytest.CaptureFixture[str], form: str) -> None:
    p = tmp_path / "d.pt"  # no manifest beside it: the file itself must be checked
    data = (finished_run / "dense.pt").read_bytes()
    if form == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif form == "empty":
        p.write_bytes(b"")
    elif form == "text":
        p.write_text("conv1.weight: [1, 2, 3]\n")
    else:
        torch.save([torch.ones(2)], p)
    need = {"truncated": "is not a readable PyTorch tensor file (truncated",
            "empty": "is not a readable PyTorch tensor file (it does not start like one: the file is empty",
            "text": "is not a readable PyTorch tensor file (it does not start like one",
            "list": "is not a state dict (expected a {name: tensor} dict, got list)"}[form]
    _dense(tmp_path, config, p, capsys, need)


def test_dense_checkpoint_checked_against_its_manifest(tmp_path: Path, config: Path, run_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = run_dir / "dense.pt"
    data = bytearray(ckpt.read_bytes())
    data[-30] ^= 1  # same size, one bit flipped (torch's zip reader would not notice everywhere)
    ckpt.write_bytes(bytes(data))
    _dense(tmp_path, config, ckpt, capsys, "content differs from its SHA-256 in manifest.json")
    _truncate(ckpt)
    _dense(tmp_path, config, ckpt, capsys, "bytes, but the run wrote")
    (run_dir / "stray.pt").write_bytes(b"")
    _dense(tmp_path, config, run_dir / "stray.pt", capsys, "is not listed in")


# ------------------------------------------------------------------------------------ run: config, --set
def test_config_not_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\x7fELF\x02\x01\x01\x00\xf0\x9f\x28\x8c" * 10)
    _fails(["run", "--config", str(p), "--out", str(tmp_path / "o")], capsys, "--config", "not a text")
    assert not (tmp_path / "o").exists()


def test_config_with_python_tag_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "PWNED"
    p = tmp_path / "evil.yaml"
    p.write_text(f"model: !!python/object/apply:builtins.open [{str(sentinel)!r}, w]\n")
    _fails(["run", "--config", str(p), "--out", str(tmp_path / "o")], capsys, "not valid YAML")
    assert not sentinel.exists() and not (tmp_path / "o").exists()


def test_set_value_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["run", "--out", str(tmp_path / "o"), "--set", "recipe.prune.sparsity=[0.5"], capsys,
           "--set recipe.prune.sparsity=[0.5", "not valid YAML")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- export
def _export_fails(run: Path, capsys: pytest.CaptureFixture[str], *needles: str,
                  extra: tuple[str, ...] = ()) -> str:
    before = _snapshot(run.parent)
    err = _fails(["export", str(run), "--format", "packed", *extra], capsys, *needles)
    assert _snapshot(run.parent) == before  # no export file, no temporary file, nothing changed
    return err


@pytest.mark.parametrize("name", ["report.json", "masked.pt", "dense.pt", "model/weights.pt",
                                  "model/pruning.json"])
def test_export_detects_any_truncated_file(run_dir: Path, capsys: pytest.CaptureFixture[str],
                                           name: str) -> None:
    _truncate(run_dir / name)
    _export_fails(run_dir, capsys, f"{run_dir / name}: ", "bytes, but the run wrote", "truncated",
                  "restore the file or re-run")


def test_export_detects_an_edited_weight_bits(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: instrument.weight_bits 4 -> 8 in pruning.json exported another model."""
    rec_path = run_dir / "model" / "pruning.json"
    text = rec_path.read_text()
    rec = json.loads(text)
    assert rec["instrument"]["weight_bits"] == 4
    rec["instrument"]["weight_bits"] = 8
    rec_path.write_text(json.dumps(rec, indent=1, sort_keys=True))
    _export_fails(run_dir, capsys, "pruning.json", "SHA-256 in manifest.json")
    # Without the run's manifest the record's own checksum still catches it.
    man = json.loads((run_dir / "manifest.json").read_text())
    data = rec_path.read_bytes()
    man["files"]["model/pruning.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (run_dir / "manifest.json").write_text(json.dumps(man))
    _export_fails(run_dir, capsys, "pruning.json: the record's content differs from its checksum")


def test_export_resealed_truncated_weights(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _truncate(run_dir / "model" / "weights.pt")
    _reseal(run_dir)
    _export_fails(run_dir, capsys, "weights.pt is not a readable PyTorch tensor file")


def test_export_resealed_pickle_weights_never_run(run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "PWNED"
    torch.save({"conv1.weight": Payload(sentinel)}, run_dir / "model" / "weights.pt", pickle_module=pickle)
    _reseal(run_dir)
    _export_fails(run_dir, capsys, "weights.pt holds Python objects", "refused")
    assert not sentinel.exists()


def test_export_resealed_truncated_report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _truncate(run_dir / "report.json")
    _reseal(run_dir)
    _export_fails(run_dir, capsys, "report.json: not valid JSON")


def test_export_resealed_report_without_input_shape(run_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rep = json.loads((run_dir / "report.json").read_text())
    del rep["data"]["input_shape"]
    (run_dir / "report.json").write_text(json.dumps(rep))
    _reseal(run_dir)
    _export_fails(run_dir, capsys, "data.input_shape must be 3 positive integers")


def test_export_resealed_record_of_another_model(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = json.loads((run_dir / "report.json").read_text())
    rep["config"]["model"]["name"] = "resnet32"
    (run_dir / "report.json").write_text(json.dumps(rep))
    _reseal(run_dir)
    _export_fails(run_dir, capsys, "pruning.json: the model does not match the record")


def test_export_without_manifest(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "manifest.json").unlink()
    _export_fails(run_dir, capsys, "no manifest.json", "re-run")


def test_export_truncated_manifest(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _truncate(run_dir / "manifest.json")
    _export_fails(run_dir, capsys, "manifest.json: not valid JSON")


def test_export_manifest_naming_a_file_outside_the_run(run_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    man = json.loads((run_dir / "manifest.json").read_text())
    man["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (run_dir / "manifest.json").write_text(json.dumps(man))
    _export_fails(run_dir, capsys, "manifest.json: malformed 'files' table", "inside the run folder")


def test_export_a_run_that_pruned_nothing(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    man = json.loads((run_dir / "manifest.json").read_text())
    for name in ("model/pruning.json", "model/weights.pt"):
        del man["files"][name]
        (run_dir / name).unlink()
    (run_dir / "model").rmdir()
    (run_dir / "manifest.json").write_text(json.dumps(man))
    _export_fails(run_dir, capsys, "no model/ in this run (its recipe pruned nothing)")


def test_export_unfinished_run(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A re-run in the same folder that stopped before its report: the old report.json is not its."""
    man = json.loads((run_dir / "manifest.json").read_text())
    del man["files"]["report.json"]
    (run_dir / "manifest.json").write_text(json.dumps(man))
    _export_fails(run_dir, capsys, "report.json: not listed in manifest.json", "did not finish")


@pytest.mark.parametrize("target", ["report.json", "model/weights.pt", "manifest.json"])
def test_export_output_onto_a_run_file(run_dir: Path, capsys: pytest.CaptureFixture[str],
                                       target: str) -> None:
    _export_fails(run_dir, capsys, f"--output {run_dir / target}: is a file of the run",
                  "nothing was written", extra=("--output", str(run_dir / target)))


def test_export_while_another_process_holds_the_run(run_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A live process holds run.lock (e.g. a run resuming into the folder): export is refused, the lock
    left alone."""
    from prunequant.runfolder import HOST, proc_start

    holder = {"pid": os.getpid(), "host": HOST, "started": proc_start(os.getpid()), "time": 0.0}
    (run_dir / "run.lock").write_text(json.dumps(holder))
    _export_fails(run_dir, capsys, f"export {run_dir}: another prunequant process is writing this folder")
    assert json.loads((run_dir / "run.lock").read_text()) == holder


def test_export_output_is_a_folder(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _export_fails(run_dir, capsys, "is a folder; give a file name",
                  extra=("--output", str(run_dir / "model")))


# ---------------------------------------------------------------------------------------- atomic_write
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_mode_is_what_open_would_give(tmp_path: Path, umask: int) -> None:
    from prunequant.utils import atomic_torch_save, atomic_write_text

    old = _umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "b.pt")
        with open(tmp_path / "c.txt", "w") as f:  # the reference: a plain open()
            f.write("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.txt": 0o666 & ~umask, "b.pt": 0o666 & ~umask, "c.txt": 0o666 & ~umask}


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    from prunequant.utils import atomic_write, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "old")

    def half(p: Path) -> None:
        p.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.txt", half)
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left


def test_a_real_process_prints_one_line_and_exits_2(tmp_path: Path, config: Path) -> None:
    """The same through the console entry point in a fresh interpreter: stderr is the message alone."""
    import subprocess
    import sys

    sentinel = tmp_path / "PWNED"
    torch.save({"conv1.weight": Payload(sentinel)}, tmp_path / "evil.pt", pickle_module=pickle)
    r = subprocess.run([sys.executable, "-m", "prunequant.cli", "run", "--config", str(config), "--out",
                        str(tmp_path / "o"), "--set", f"train.dense_checkpoint={tmp_path / 'evil.pt'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: train.dense_checkpoint: {tmp_path / 'evil.pt'} holds Python "
                                     "objects, not only tensors; refused without running them (only state "
                                     "dicts written by torch.save / prunequant are loaded)"]
    assert not sentinel.exists() and not (tmp_path / "o").exists()
