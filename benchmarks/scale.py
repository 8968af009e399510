"""What one training step costs as the number of processes grows: time, collectives, bytes, checkpoint.

For each process count W (default 1, 2, 4) this starts W real gloo processes on this machine
(``torch.multiprocessing``, ``init_method=file://``), each training the configured model on its
slice of the same global batches of full Fashion-MNIST exactly as ``prunequant run`` under
``torchrun`` does (:mod:`prunequant.parallel`: DDP, BatchNorm over the global batch). Three windows
of steps are measured, each on the same global batches:

* ``dense``: DDP training of the dense network (no compression state);
* ``pruning``: the layerwise schedule while one mask gathers statistics (a mask recomputed at the
  window's end: its ``comp.step()`` time is reported separately);
* ``qat``: every mask frozen, every weight and activation quantizer on and gathering.

Counted per step on rank 0: the collectives prunequant issues from Python (all_reduce /
all_gather / broadcast: calls and bytes) and DDP's gradient buckets (a communication hook counts
them). Also the size of a checkpoint (model, optimizer, every rank's random state) as
``prunequant run`` writes it. Timings are medians over the window; machines differ, so the table
gives each W's step time as a ratio to W=1 measured in the same run, and names the CPU.

    .venv/bin/python benchmarks/scale.py                        # ResNet-56, batch 128, W = 1 2 4
    .venv/bin/python benchmarks/scale.py --procs 1 2 --steps 6  # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from memory import jump_to_qat  # noqa: E402  (benchmarks/memory.py)

from prunequant import Compressor, parallel  # noqa: E402
from prunequant.export.cpu import machine_info  # noqa: E402
from prunequant.models import build_model  # noqa: E402
from prunequant.train import checkpoint as ck  # noqa: E402
from prunequant.train.trainer import _BatchStream, load_data  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "scale"


class _Counter:
    """Counts the collectives issued from Python (and, through a DDP hook, the gradient buckets)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._orig: dict[str, Any] = {}
        self.in_hook = False  # DDP's own all-reduce (inside the hook) is counted as ddp_gradients only

    def add(self, kind: str, nbytes: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes

    def install(self) -> None:
        for name in ("all_reduce", "all_gather", "broadcast"):
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*a: Any, _o: Any = orig, _n: str = name, **k: Any) -> Any:
                t = a[1] if _n == "all_gather" else a[0]
                if not self.in_hook:
                    self.add(_n, t.numel() * t.element_size())
                return _o(*a, **k)

            setattr(dist, name, wrapped)

    def hook(self) -> Any:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting(state: Any, bucket: Any) -> Any:
            t = bucket.buffer()
            self.add("ddp_gradients", t.numel() * t.element_size())
            self.in_hook = True
            try:
                return allreduce_hook(state, bucket)
            finally:
                self.in_hook = False

        # DDP checks the annotations themselves (not their strings)
        counting.__annotations__ = {"state": object, "bucket": dist.GradBucket,
                                    "return": torch.futures.Future[torch.Tensor]}
        return counting

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        return dict(self.calls), dict(self.bytes)


def _diff(a: dict[str, int], b: dict[str, int], steps: int) -> dict[str, float]:
    keys = sorted(set(a) | set(b))
    return {k: (b.get(k, 0) - a.get(k, 0)) / steps for k in keys if b.get(k, 0) != a.get(k, 0)}


def _worker(rank: int, world: int, init: str, args: dict[str, Any], out: str) -> None:
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        _measure(rank, world, args, out, threads)
    finally:
        dist.destroy_process_group()


def _measure(rank: int, world: int, args: dict[str, Any], out: str, threads: int) -> None:
    from prunequant.config import RunConfig

    cfg = RunConfig.from_dict({"model": {"name": args["model"]},
                               "data": {"name": "fashion_mnist", "batch_size": args["batch"]},
                               "train": {"seed": 0}})
    data = load_data(cfg, log=lambda m: None)
    torch.manual_seed(0)
    model = build_model(args["model"], num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size)
    stream = _BatchStream(data.train, args["batch"], 0, rank, world)
    job = parallel.Job(rank=rank, world=world)
    counter = _Counter()
    counter.install()
    n = args["steps"]
    example = next(iter(torch.utils.data.DataLoader(data.val, batch_size=8)))[0]

    def train(net: torch.nn.Module, params: Any, steps: int, after: Any = None) -> list[float]:
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        times = []
        for _ in range(steps):
            x, y = next(stream)
            t = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after is not None:
                after()
            times.append(time.perf_counter() - t)
        return times

    res: dict[str, Any] = {"world": world, "threads_per_process": threads}

    def window(name: str, module: torch.nn.Module, after: Any = None) -> None:
        with parallel.synced_batchnorm(module):
            net = parallel.wrap(module, job)
            if world > 1:
                net.register_comm_hook(None, counter.hook())
            train(net, module.parameters(), 2, after)  # warm-up (DDP builds its buckets)
            c0, b0 = counter.snapshot()
            times = train(net, module.parameters(), n, after)
            c1, b1 = counter.snapshot()
        res[name] = {"step_s": statistics.median(times), "calls_per_step": _diff(c0, c1, n),
                     "bytes_per_step": _diff(b0, b1, n)}

    window("dense", model)

    # Layerwise pruning: the first mask gathers for the whole measured window, then is recomputed.
    per = n + 2
    recipe = {"prune": {"sparsity": 0.5, "unit": "steps", "start": 0, "interval": per, "refresh": per},
              "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 0, "act_delay": 0}}
    comp = Compressor(model, recipe, example)
    step_times: list[float] = []

    def comp_step() -> None:
        t = time.perf_counter()
        comp.step()
        step_times.append(time.perf_counter() - t)

    window("pruning", comp.model, comp_step)
    res["pruning"]["mask_recompute_s"] = max(step_times)  # the step at which the first mask is chosen
    res["pruning"]["comp_step_median_s"] = statistics.median(step_times)
    # QAT: every mask frozen at its target, every quantizer on (the rest of the schedule skipped).
    jump_to_qat(comp)
    window("qat", comp.model, comp.step)

    # A checkpoint as prunequant run writes it: model + optimizer + every rank's random states.
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.01, momentum=0.9)
    train(comp.model, comp.model.parameters(), 1)
    rng, _ = ck.rng_tensors()
    ranks = parallel.gather_tensors(rng)
    body = {**{f"model.{k}": v for k, v in comp.model.state_dict().items()},
            **{f"optim.{i}": p.detach().clone() for i, p in enumerate(comp.model.parameters())},
            **{f"rank{r}.{k}": v for r, d in enumerate(ranks) for k, v in d.items()}}
    buf = io.BytesIO()
    torch.save(body, buf)
    res["checkpoint_bytes"] = buf.tell()
    res["params"] = sum(p.numel() for p in model.parameters())
    res["batchnorm_layers"] = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    res["act_quantizers"] = len(comp._aq)
    res["masks"] = len(comp._masks)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    del opt


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB" if b >= 100 else f"{b:.0f} B"


def table(rows: list[dict[str, Any]], machine: dict[str, Any], cmd: str) -> str:
    base = {w: rows[0][w]["step_s"] for w in ("dense", "pruning", "qat")}
    lines = [f"Measured on {machine.get('cpu_class', '?')} ({machine.get('cpu', '?')}, "
             f"{os.cpu_count()} cores), torch {torch.__version__}; command: `{cmd}`. "
             f"Model {rows[0].get('model')}, global batch {rows[0].get('batch')} of full Fashion-MNIST; "
             "step time is the median wall time of one step on rank 0, as a ratio to one process.", "",
             "| processes | threads each | window | step time vs 1 process | collectives per step (ours) "
             "| bytes per step (ours) | DDP gradient bytes per step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for w in ("dense", "pruning", "qat"):
            c = {k: v for k, v in r[w]["calls_per_step"].items() if k != "ddp_gradients"}
            b = {k: v for k, v in r[w]["bytes_per_step"].items() if k != "ddp_gradients"}
            calls = ", ".join(f"{k} {v:g}" for k, v in c.items()) or "none"
            nbytes = _fmt_bytes(sum(b.values())) if b else "0"
            g = r[w]["bytes_per_step"].get("ddp_gradients", 0)
            ratio = r[w]["step_s"] / base[w]
            lines.append(f"| {r['world']} | {r['threads_per_process']} | {w} | {ratio:.2f}x "
                         f"| {calls} | {nbytes} | {_fmt_bytes(g) if g else '0'} |")
    lines += ["", "| processes | mask recomputation (one comp.step) | checkpoint size |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world']} | {1000 * r['pruning']['mask_recompute_s']:.1f} ms "
                     f"(median step {1000 * r['pruning']['comp_step_median_s']:.2f} ms) | "
                     f"{_fmt_bytes(r['checkpoint_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="measured steps per window")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    for w in a.procs:
        if a.batch % w:
            ap.error(f"--batch {a.batch} cannot be split evenly over {w} processes; use a multiple of {w}")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for w in a.procs:
        tmp = a.out / f".store_{w}_{os.getpid()}"
        res_path = a.out / f"w{w}.json"
        t = time.time()
        mp.spawn(_worker, args=(w, f"file://{tmp.resolve()}", vars(a) | {"out": None}, str(res_path)),
                 nprocs=w, join=True)
        tmp.unlink(missing_ok=True)
        r = json.loads(res_path.read_text())
        res_path.unlink()
        r.update(model=a.model, batch=a.batch)
        rows.append(r)
        ms = {k: round(r[k]["step_s"] * 1000) for k in ("dense", "pruning", "qat")}
        print(f"W={w}: ms per step {ms} ({time.time() - t:.0f} s)", flush=True)
    machine = machine_info()
    cmd = "python " + " ".join(["benchmarks/scale.py", *(argv if argv is not None else sys.argv[1:])])
    (a.out / "scale.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    md = table(rows, machine, cmd.strip())
    (a.out / "scale.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
