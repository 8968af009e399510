"""Kill a real ``prunequant run`` process (SIGKILL) and resume it: the result is the uninterrupted run's,
bit for bit (masks, quantizer buffers, weights, report numbers; timings aside).

The run kills itself at a chosen global step through the test hook ``_PRUNEQUANT_KILL_AFTER_STEP``
(after that step's checkpoint, if one is due) or in the middle of writing a checkpoint
(``_PRUNEQUANT_KILL_IN_CHECKPOINT``: the temporary file is cut in half, then SIGKILL), so the moment
is deterministic. Tiny run: ResNet-20 x0.25 on 256 digits, 4 steps per epoch, 8 dense steps, then 40
compression steps: layerwise pruning in compression steps 2..28 (global 10..36), QAT from compression
step 30 (global 38); a checkpoint every 3 global steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prunequant.cli import main
from prunequant.config import RunConfig
from prunequant.train.trainer import resumable, run_and_report

TINY = {
    "model": {"name": "resnet20", "width": 0.25},
    "data": {"name": "digits", "batch_size": 64, "train_subset": 256, "test_subset": 128},
    "train": {"dense_epochs": 2, "epochs": 10, "lr": 0.05, "compress_lr": 0.02, "progress": False,
              "threads": 1, "checkpoint_every": 3},
    "recipe": {
        "prune": {"sparsity": 0.5, "unit": "steps", "start": 2, "interval": 2, "refresh": 1},
        "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 2, "act_delay": 1},
    },
}
Cap = pytest.CaptureFixture[str]
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "OMP_NUM_THREADS": "1",
         **(env or {})}
    return subprocess.run([sys.executable, "-m", "prunequant.cli", "run", "--no-progress", *args],
                          capture_output=True, text=True, env=e, timeout=600)


def _config(tmp: Path, **train) -> Path:
    d = json.loads(json.dumps(TINY))
    d["train"].update(train)
    p = tmp / "tiny.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (in this process, like the resumed ones: their comparison with the killed
    subprocess's files shows that the process does not matter)."""
    root = tmp_path_factory.mktemp("reference")
    assert main(["run", "--no-progress", "--config", str(_config(root)), "--out", str(root / "run")]) == 0
    rep = json.loads((root / "run" / "report.json").read_text())
    assert rep["steps"] == {"dense": 8, "compress": 40}
    assert rep["timeline"] == {"prune_begin": 2, "prune_end": 28, "quant_begin": 29, "weight_quant_at": 31,
                               "act_quant_at": 30}
    return root / "run"


def _killed(tmp: Path, env: dict[str, str], **train) -> Path:
    out = tmp / "run"
    r = _cli(["--config", str(_config(tmp, **train)), "--out", str(out)], env)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert not (out / "report.json").exists() and (out / "run.lock").exists()  # died holding the lock
    return out


def _listed_checkpoints(out: Path) -> list[str]:
    files = json.loads((out / "manifest.json").read_text())["files"]
    return sorted(n for n in files if n.startswith("checkpoints/"))


def _resume(out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["run", "--no-progress", "--resume", str(out)]) == 0
    log = capsys.readouterr().out
    assert "took over the lock" in log  # the dead process's lock
    return log


def _same_run(a: Path, b: Path, config_too: bool = True) -> None:
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra.keys() == rb.keys()
    skip = {"timing"} | (set() if config_too else {"config"})
    for k in ra:
        if k not in skip:
            assert ra[k] == rb[k], k
    for name in ("masked.pt", "model/weights.pt", "dense.pt"):
        x = torch.load(a / name, weights_only=True)
        y = torch.load(b / name, weights_only=True)
        assert x.keys() == y.keys(), name
        differing = [k for k in x if not torch.equal(x[k], y[k])]
        assert not differing, (name, differing[:5])
    masked = torch.load(b / "masked.pt", weights_only=True)  # the comparison covered these:
    assert any(k.endswith(".mask") for k in masked) and any(k.endswith("min_sum") for k in masked)
    man = json.loads((b / "manifest.json").read_text())["files"]
    assert "report.json" in man and not [n for n in man if n.startswith("checkpoints/")]
    assert not (b / "checkpoints").exists() and not (b / "run.lock").exists()


def _ckpt(out: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    state = torch.load(out / name, weights_only=True)
    meta = json.loads(bytes(state.pop("meta").tolist()).decode())
    return state, meta


def test_killed_in_the_middle_of_layerwise_pruning(reference: Path, tmp_path: Path, capsys: Cap) -> None:
    out = _killed(tmp_path, {"_PRUNEQUANT_KILL_AFTER_STEP": "20"})
    assert _listed_checkpoints(out) == ["checkpoints/step-000000015.pt", "checkpoints/step-000000018.pt"]
    state, meta = _ckpt(out, "checkpoints/step-000000018.pt")
    assert meta["phase"] == "compress" and meta["step"] == 10 and int(state["model.pq_step"]) == 10
    frozen = [bool(state[k]) for k in state if k.endswith("frozen") and k.replace("frozen", "mask") in state]
    assert 0 < sum(frozen) < len(frozen) == 9  # some layers pruned, others not yet
    assert any(k.startswith("optim.") and k.endswith("momentum_buffer") for k in state)
    log = _resume(out, capsys)
    assert "from checkpoints/step-000000018.pt (step 18 of 48, compress phase)" in log
    _same_run(reference, out)


def test_killed_in_the_middle_of_qat(reference: Path, tmp_path: Path, capsys: Cap) -> None:
    out = _killed(tmp_path, {"_PRUNEQUANT_KILL_AFTER_STEP": "44"})
    state, meta = _ckpt(out, _listed_checkpoints(out)[-1])
    assert meta["global_step"] == 42 and meta["step"] == 34
    act_on = [bool(state[k]) for k in state
              if k.endswith(".enabled") and k.replace("enabled", "min_sum") in state]
    assert act_on and all(act_on)  # activation quantizers on: QAT
    assert "pruned" in meta["results"]["snap"]  # measured before the kill, carried over
    log = _resume(out, capsys)
    assert "step 42 of 48, compress phase" in log
    _same_run(reference, out)


def test_killed_in_the_dense_phase(reference: Path, tmp_path: Path, capsys: Cap) -> None:
    out = _killed(tmp_path, {"_PRUNEQUANT_KILL_AFTER_STEP": "5"})
    assert _listed_checkpoints(out) == ["checkpoints/step-000000003.pt"]
    assert "dense.pt" not in json.loads((out / "manifest.json").read_text())["files"]
    assert "step 3 of 48, dense phase" in _resume(out, capsys)
    _same_run(reference, out)


def test_killed_without_checkpoints_after_the_dense_phase(reference: Path, tmp_path: Path,
                                                         capsys: Cap) -> None:
    """Checkpoints off: the dense phase's dense.pt is where the run continues (and the checkpoint
    settings do not change any result)."""
    out = _killed(tmp_path, {"_PRUNEQUANT_KILL_AFTER_STEP": "30"}, checkpoint_every=None,
                  checkpoint_minutes=None)
    assert _listed_checkpoints(out) == []
    assert "from its dense.pt (compression step 0)" in _resume(out, capsys)
    _same_run(reference, out, config_too=False)


def test_a_crash_while_writing_a_checkpoint_keeps_the_last_good_one(reference: Path, tmp_path: Path,
                                                                   capsys: Cap) -> None:
    out = _killed(tmp_path, {"_PRUNEQUANT_KILL_IN_CHECKPOINT": "27"})
    half = list((out / "checkpoints").glob(".step-000000027.pt.*.tmp"))
    good = out / "checkpoints" / "step-000000024.pt"
    assert len(half) == 1 and half[0].stat().st_size < good.stat().st_size
    assert _listed_checkpoints(out) == ["checkpoints/step-000000021.pt", "checkpoints/step-000000024.pt"]
    assert "step 24 of 48" in _resume(out, capsys)
    _same_run(reference, out)
    assert not half[0].exists()


def test_the_batch_stream_is_the_shuffled_loader_and_resumes_anywhere() -> None:
    """``_BatchStream`` gives the batches of ``DataLoader(shuffle=True, drop_last=True, generator=g)``
    epoch after epoch (the order every run had before checkpoints), and a stream restored from any
    saved position continues with exactly the batches (and generator states) of the original."""
    from torch.utils.data import DataLoader, TensorDataset

    from prunequant.train.trainer import _batches, _BatchStream

    data = TensorDataset(torch.arange(50).float().unsqueeze(1), torch.arange(50))
    g = torch.Generator().manual_seed(7)
    old = _batches(DataLoader(data, batch_size=8, shuffle=True, drop_last=True, generator=g))
    stream = _BatchStream(data, 8, seed=7)
    assert len(stream) == 6
    ref, saved = [], []
    for _ in range(20):  # 3 1/3 epochs
        saved.append(stream.position())
        b = next(stream)
        assert torch.equal(b[1], next(old)[1])
        ref.append(b[1])
    for k in (0, 1, 5, 6, 7, 13):
        other = _BatchStream(data, 8, seed=7)
        other.seek(*saved[k])
        got = [next(other)[1] for _ in range(20 - k)]
        assert all(torch.equal(a, b) for a, b in zip(got, ref[k:])), k
    stream.restart()
    assert torch.equal(next(stream)[1], ref[0])


def test_benchmark_cells_continue_a_killed_run(reference: Path, tmp_path: Path) -> None:
    """What grid.py / groups_main.py do with a cell folder: ``resumable`` says whether it holds an
    unfinished run of exactly this configuration; ``run_and_report(resume=True)`` then ends with the
    uninterrupted run."""
    out = _killed(tmp_path, {"_PRUNEQUANT_KILL_AFTER_STEP": "20"})
    cfg = RunConfig.from_dict(yaml.safe_load(_config(tmp_path).read_text()), where="test")
    other = RunConfig.from_dict({**yaml.safe_load(_config(tmp_path).read_text()), "train": {
        **TINY["train"], "seed": 1}}, where="test")
    assert resumable(out, cfg) and not resumable(out, other)
    assert not resumable(tmp_path / "nowhere", cfg)
    assert not resumable(reference, cfg)  # finished: nothing to continue
    report, paths = run_and_report(cfg, out, log=lambda m: None, resume=True)
    assert paths["report"] == out / "report.json" and report["phases"]["final"]["accuracy"] >= 0
    assert not resumable(out, cfg)  # finished now
    _same_run(reference, out)
