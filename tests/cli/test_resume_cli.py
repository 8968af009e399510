"""`prunequant run --resume` / `--overwrite` and the run lock: every refusal is one message, exit code 2.

One tiny run is killed (SIGKILL, through the test hook ``_PRUNEQUANT_KILL_AFTER_STEP``) in the middle
of layerwise pruning, leaving checkpoints at global steps 15 and 18; each test copies that folder.
docs/errors.md lists these cases with the messages they print.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from clitools import fails as _fails

from prunequant.cli import main
from prunequant.recipe import RecipeError
from prunequant.runfolder import HOST, LOCK, RunLock

TINY = {
    "model": {"name": "resnet20", "width": 0.25},
    "data": {"name": "digits", "batch_size": 64, "train_subset": 256, "test_subset": 128},
    "train": {"dense_epochs": 2, "epochs": 8, "lr": 0.05, "compress_lr": 0.02, "progress": False,
              "threads": 1, "checkpoint_every": 3},
    "recipe": {
        "prune": {"sparsity": 0.5, "unit": "steps", "start": 2, "interval": 2, "refresh": 1},
        "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 2, "act_delay": 1},
    },
}
SRC = str(Path(__file__).resolve().parents[2] / "src")
Cap = pytest.CaptureFixture[str]


def _popen(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "prunequant.cli", "run", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)


def _write_config(path: Path, **train) -> Path:
    d = json.loads(json.dumps(TINY))
    d["train"].update(train)
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("killed")
    cfg = _write_config(root / "tiny.yaml")
    p = _popen(["--config", str(cfg), "--out", str(root / "run")], {"_PRUNEQUANT_KILL_AFTER_STEP": "20"})
    _, err = p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL, err
    return root / "run"


@pytest.fixture
def run(killed_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(killed_run, dst)
    _write_config(tmp_path / "tiny.yaml")
    return dst


def _snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def test_resume_refuses_a_changed_configuration(run: Path, tmp_path: Path, capsys: Cap) -> None:
    other = _write_config(tmp_path / "other.yaml", lr=0.1)
    before = _snapshot(tmp_path)
    _fails(["run", "--resume", str(run), "--set", "train.seed=1", "--set", "recipe.prune.sparsity=0.75"],
           capsys,
           f"--resume {run}: the configuration differs from the run's config.json",
           "recipe.prune.sparsity: 0.5 in the run, 0.75 given; train.seed: 0 in the run, 1 given",
           "drop --config / --set", "nothing was written")
    _fails(["run", "--resume", str(run), "--config", str(other)], capsys,
           "train.lr: 0.05 in the run, 0.1 given")
    assert _snapshot(tmp_path) == before
    # The same configuration given again (and --no-progress, display only) is no change.
    assert main(["run", "--resume", str(run), "--config", str(tmp_path / "tiny.yaml"), "--no-progress"]) == 0
    assert "report.json" in json.loads((run / "manifest.json").read_text())["files"]


def test_resume_and_overwrite_bad_folders(run: Path, tmp_path: Path, capsys: Cap) -> None:
    before = _snapshot(tmp_path)
    _fails(["run", "--resume", str(tmp_path / "nowhere")], capsys, "no such folder")
    (tmp_path / "empty").mkdir()
    _fails(["run", "--resume", str(tmp_path / "empty")], capsys, "holds no prunequant run (no manifest.json)")
    _fails(["run", "--resume", str(run), "--overwrite"], capsys,
           "--resume and --overwrite exclude each other")
    _fails(["run", "--resume", str(run), "--out", str(tmp_path / "elsewhere")], capsys,
           "name different folders")
    # --out at an unfinished run's folder: resume it or replace it, nothing else.
    _fails(["run", "--config", str(tmp_path / "tiny.yaml"), "--out", str(run)], capsys,
           f"--out {run}: holds an unfinished run (manifest.json without report.json); a run folder "
           f"belongs to one run: continue it with `prunequant run --resume {run}`, replace it with "
           "--overwrite, or choose a new folder (nothing was written)")
    assert _snapshot(tmp_path) == before
    # A finished run cannot be resumed.
    man = json.loads((run / "manifest.json").read_text())
    man["files"]["report.json"] = {"sha256": "0" * 64, "bytes": 1}
    (run / "manifest.json").write_text(json.dumps(man))
    _fails(["run", "--resume", str(run)], capsys, "holds a finished run", "cannot be resumed",
           f"--out {run} --overwrite")


def test_a_corrupted_checkpoint_is_refused(run: Path, tmp_path: Path, capsys: Cap) -> None:
    newest = run / "checkpoints" / "step-000000018.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    before = _snapshot(tmp_path, skip=(LOCK,))
    _fails(["run", "--resume", str(run)], capsys,
           f"--resume: checkpoint {newest}: content differs from its SHA-256 in manifest.json",
           f"delete it to resume from the checkpoint before it ({run / 'checkpoints' / 'step-000000015.pt'})",
           "or start the run again with --overwrite")
    assert _snapshot(tmp_path, skip=(LOCK,)) == before
    # Truncated with its checksum updated (as a deliberate edit could): the file check still refuses it.
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    man = json.loads((run / "manifest.json").read_text())
    man["files"]["checkpoints/step-000000018.pt"] = {
        "sha256": hashlib.sha256(newest.read_bytes()).hexdigest(), "bytes": newest.stat().st_size}
    (run / "manifest.json").write_text(json.dumps(man))
    _fails(["run", "--resume", str(run)], capsys,
           f"--resume: checkpoint: {newest} is not a readable PyTorch tensor file (truncated")
    # As the message says: without the damaged file the run resumes from the one before it.
    newest.unlink()
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "step-000000018.pt is listed but missing" in out and "from checkpoints/step-000000015.pt" in out


def test_two_runs_into_one_folder(tmp_path: Path, capsys: Cap) -> None:
    """While one process runs into a folder, a second one is refused, whatever its flags."""
    cfg = _write_config(tmp_path / "long.yaml", dense_epochs=200)  # 800 dense steps: the first keeps running
    out = tmp_path / "run"
    first = _popen(["--config", str(cfg), "--out", str(out)])
    try:
        t0 = time.time()
        while not (out / "config.json").exists():
            assert first.poll() is None and time.time() - t0 < 300, first.communicate()
            time.sleep(0.05)
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == first.pid and holder["host"] == HOST
        _fails(["run", "--config", str(cfg), "--out", str(out)], capsys, "holds an unfinished run")
        for flag in ("--overwrite", "--resume"):
            args = ["run", "--config", str(cfg), "--out", str(out), "--overwrite"] if flag == "--overwrite" \
                else ["run", "--resume", str(out)]
            _fails(args, capsys,
                   f"{out}: another prunequant process is writing this folder (pid {first.pid} on {HOST}",
                   "a run folder belongs to one run", "(nothing was written)")
        assert first.poll() is None  # still running, its folder untouched
        assert json.loads((out / LOCK).read_text()) == holder and (out / "config.json").exists()
    finally:
        first.kill()
        first.communicate()


def test_run_lock_takes_over_only_a_dead_process_lock(tmp_path: Path) -> None:
    lock = tmp_path / LOCK
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": HOST, "started": "1", "time": time.time()}))
    said: list[str] = []
    mine = RunLock(tmp_path)
    mine.acquire(said.append)
    assert said and f"took over the lock of pid {dead.pid} on {HOST}" in said[0]
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    live = f"another prunequant process is writing this folder \\(pid {os.getpid()}"
    with pytest.raises(RecipeError, match=live):
        RunLock(tmp_path).acquire(said.append)  # a live holder (this process)
    mine.release()
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "another-host", "started": "1", "time": time.time()}))
    with pytest.raises(RecipeError, match=f"cannot be checked from here\\), delete {lock}"):
        RunLock(tmp_path).acquire(said.append)
    assert json.loads(lock.read_text())["host"] == "another-host"


def test_overwrite_removes_the_earlier_run(run: Path, tmp_path: Path, capsys: Cap) -> None:
    """--overwrite replaces the folder's run: no file of the killed run (its checkpoints, a stale
    dense.pt of another seed) survives beside the new report; files that are not a run's stay."""
    (run / "notes.txt").write_text("mine\n")
    old_dense = (run / "dense.pt").read_bytes()
    assert main(["run", "--config", str(tmp_path / "tiny.yaml"), "--out", str(run), "--overwrite",
                 "--set", "train.seed=1", "--set", "train.checkpoint_every=null"]) == 0
    files = json.loads((run / "manifest.json").read_text())["files"]
    assert sorted(files) == ["config.json", "dense.pt", "masked.pt", "model/pruning.json", "model/weights.pt",
                             "report.json"]
    assert not (run / "checkpoints").exists() and not (run / LOCK).exists()
    assert (run / "dense.pt").read_bytes() != old_dense  # seed 1's own dense network
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 1
    assert (run / "notes.txt").read_text() == "mine\n"
    assert torch.load(run / "masked.pt", weights_only=True)


def test_resume_a_run_an_older_prunequant_started(run: Path, capsys: Cap) -> None:
    """A run whose config.json lacks fields a newer prunequant added (with defaults) resumes: its
    checkpoints carry the digest of config.json as it was written, not as it is re-read."""
    from prunequant.runfolder import RunFolder
    from prunequant.train.trainer import _config_digest

    cfg = json.loads((run / "config.json").read_text())
    for k in ("patch_size", "patches_per_epoch", "sigma", "channels", "scale"):
        cfg["data"].pop(k, None)  # fields this version added
    cfg["train"].pop("optimizer", None)
    (run / "config.json").write_text(json.dumps(cfg))
    folder = RunFolder(run, existing=True)
    folder.record("config.json")
    listed = json.loads((run / "manifest.json").read_text())["files"]
    for name in [n for n in listed if n.startswith("checkpoints/")]:
        state = torch.load(run / name, weights_only=True)
        meta = json.loads(bytes(state["meta"].tolist()).decode())
        meta["config_sha256"] = _config_digest(cfg)  # what the older version wrote
        state["meta"] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        torch.save(state, run / name)
        folder.record(name)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert "report.json" in json.loads((run / "manifest.json").read_text())["files"]
