"""`torchrun --nproc_per_node=2 -m prunequant run`: two real gloo processes run one job.

"Same global batches" (prunequant.parallel): both ranks draw the one-process run's batches of
``data.batch_size`` and take one half each; BatchNorm, gradients and activation-quantizer ranges are
computed over the global batch, mask statistics averaged over the ranks. So the two-process run must
end with the one-process run's masks, quantizer parameters and report; continuous values agree to
float rounding (the reductions add in another order), discrete ones exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from prunequant.runfolder import verify_run

SRC = str(Path(__file__).resolve().parents[2] / "src")
TINY = {
    "model": {"name": "resnet20", "width": 0.25},
    "data": {"name": "digits", "batch_size": 64, "train_subset": 384, "test_subset": 200, "augment": False},
    "train": {"dense_epochs": 2, "epochs": 6, "lr": 0.05, "compress_lr": 0.02, "progress": False,
              "threads": 1, "seed": 3, "checkpoint_every": 3},
    "recipe": {
        "prune": {"sparsity": 0.5, "unit": "steps", "start": 2, "interval": 2, "refresh": 1},
        "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 4, "act_delay": 2},
    },
}

# one xdist worker runs the module, so the two runs of the fixture are made once
pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built"),
              pytest.mark.xdist_group("torchrun")]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "prunequant", "run", "--no-progress", *args],
                          capture_output=True, text=True, env={**_env(), **env}, timeout=600, check=False)


def _one(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunequant", "run", "--no-progress", *args],
                          capture_output=True, text=True, env=_env(), timeout=600, check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("torchrun")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    one = _one(["--config", str(cfg), "--out", str(root / "one")])
    assert one.returncode == 0, one.stderr
    two = _torchrun(["--config", str(cfg), "--out", str(root / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one", root / "two", two.stdout


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "masked.pt", weights_only=True)


def test_two_processes_end_with_the_one_process_masks_quantizers_and_report(runs) -> None:
    one, two, _ = runs
    a, b = _state(one), _state(two)
    assert a.keys() == b.keys()
    masks = [k for k in a if k.endswith(".mask")]
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)
    assert all(int((a[k] == 0).sum()) > 0 for k in masks)  # something was pruned
    quant = [k for k in a if k.endswith(("min_sum", "max_sum")) or ".wq" in k or "stat_sum" in k]
    assert quant
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
        else:
            assert torch.equal(a[k], b[k]), k

    ra = json.loads((one / "report.json").read_text())
    rb = json.loads((two / "report.json").read_text())
    for phase in ra["phases"]:
        assert ra["phases"][phase] == rb["phases"][phase], phase  # accuracies, memory, MACs, bits
    assert [r["channels_after"] for r in ra["layers"]] == [r["channels_after"] for r in rb["layers"]]
    assert ra["steps"] == rb["steps"]
    proc = rb["processes"]
    assert proc["world_size"] == 2 and proc["backend"] == "gloo"
    assert proc["per_process_batch"] * 2 == proc["global_batch"] == TINY["data"]["batch_size"]
    assert proc["state_identical_on_all_ranks"] is True
    assert "processes" not in ra


def test_only_rank_0_writes_and_prints(runs) -> None:
    _, two, out = runs
    verify_run(two, ["report.json", "masked.pt", "config.json"])  # one manifest, every file intact
    assert "- processes: 2 (gloo), global batch 64 = 32 per process; model and compression state identical " \
        "on all ranks: yes" in out
    assert out.count("(2 processes)") == 1 and out.count("# prunequant run") == 1  # header, summary
    assert out.count("\nwrote ") == 1
    assert not list(two.glob("checkpoints/*"))


def test_two_processes_killed_mid_pruning_resume_bit_for_bit(runs, tmp_path: Path) -> None:
    """Both ranks SIGKILLed after global step 20 (compression step 8, layerwise pruning; the last
    checkpoint is step 18), then ``torchrun ... run --resume``: the uninterrupted two-process run's
    files, bit for bit."""
    _, two, _ = runs
    cfg = two.parent / "tiny.yaml"
    out = tmp_path / "killed"
    r = _torchrun(["--config", str(cfg), "--out", str(out)], _PRUNEQUANT_KILL_AFTER_STEP="20")
    assert r.returncode != 0 and not (out / "report.json").exists()
    ckpts = json.loads((out / "manifest.json").read_text())["files"]
    assert "checkpoints/step-000000018.pt" in ckpts
    saved = torch.load(out / "checkpoints/step-000000018.pt", weights_only=True)
    assert any(k.startswith("rank1.rng.") for k in saved)  # rank 1's random state travelled to rank 0
    r = _torchrun(["--resume", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "step 18 of 48" in r.stdout
    a, b = _state(two), _state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((two / "report.json").read_text())
    rb = json.loads((out / "report.json").read_text())
    assert ra["phases"] == rb["phases"]


def test_two_nodes_through_a_rendezvous_run_the_same_job(runs, tmp_path: Path) -> None:
    """Two torchrun launchers (``--nnodes=2``, one process each, c10d rendezvous on this host): the
    multi-node command line of docs/scale.md gives the standalone two-process run, bit for bit."""
    _, two, _ = runs
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=pq_nodes", "-m",
           "prunequant", "run", "--no-progress", "--config", str(two.parent / "tiny.yaml"), "--out", str(out)]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sum(o.count("(2 processes)") for o, _ in outs) == 1  # one launcher's process is rank 0
    a, b = _state(two), _state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "report.json").read_text())["processes"]["state_identical_on_all_ranks"]


def test_a_batch_that_cannot_be_split_is_one_message(tmp_path: Path) -> None:
    cfg = tmp_path / "odd.yaml"
    d = json.loads(json.dumps(TINY))
    d["data"]["batch_size"] = 63
    cfg.write_text(yaml.safe_dump(d))
    r = _torchrun(["--config", str(cfg), "--out", str(tmp_path / "o")])
    assert r.returncode != 0
    assert r.stderr.count("error: data.batch_size=63 cannot be split evenly over 2 processes") == 1, r.stderr
    # Exit code 2 and no traceback of ours; torchrun's launcher prints its own report (and may stop the
    # second rank with SIGTERM once the first has exited).
    assert "exitcode  : 2" in r.stderr, r.stderr
    assert not [ln for ln in r.stderr.splitlines() if ln.strip().startswith("File ")
                and ("src/prunequant/" in ln or "site-packages/prunequant/" in ln)]
    assert not (tmp_path / "o").exists()
