"""CPU latency of the model ``Compressor.finalize()`` returns against the same pruned model in float.

For ResNet-20 and ResNet-56 (``prunequant.models.build_model``, 1 x 28 x 28 inputs, 10 classes) and a
W8A8 and a W4A4 recipe at 50 % sparsity, the script runs the compression schedule (unit ``steps``) on
random data until ``finalize()`` succeeds, then times on one thread, at each batch size:

* ``quant``: the finalized model (pruned channels removed, quantizers frozen, eval mode), as it runs now
  (eval-mode quantizer caches on);
* ``uncached``: the same model inside ``prunequant.quant.quantizers.eval_cache(False)``, i.e. the code as
  it was before the caches (every call re-derives the weight scales, the fake-quantized weights and the
  activation ``(step, zero_point)``, and fake-quantizes out of place through autograd);
* ``float``: a copy of the finalized model with its weight parametrizations removed (the raw weights)
  and its activation quantizers disabled: the same physically smaller network without quantizers.

The three run interleaved (the order rotating each round) under ``torch.inference_mode``; each round
times ``--iters`` forward passes of each. Per round the script takes the ratios ``quant / float`` and
``uncached / float`` and reports their median and range over the rounds, for the wall clock and for the
thread's CPU time (``time.thread_time``, which other processes' load disturbs less). The finalized
model's outputs with and without the caches are compared bit for bit.

    python benchmarks/finalized_speed.py [--rounds 15] [--models resnet20 resnet56] [--bits 8 4]
                                         [--batches 1 64] [--out benchmarks/results/finalized_speed]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from prunequant import Compressor
from prunequant.export.cpu import machine_info
from prunequant.models import build_model
from prunequant.quant.quantizers import ActQuantizer, eval_cache

IMAGE = 28
OUT = Path(__file__).resolve().parent / "results" / "finalized_speed"


def recipe(bits: int, sparsity: float = 0.5) -> dict:
    """A WbAb recipe at ``sparsity`` whose whole schedule runs in a few steps."""
    return {"prune": {"sparsity": sparsity, "importance": "a_l1", "schedule": "layerwise", "unit": "steps",
                      "start": 0, "interval": 1, "refresh": 1},
            "quant": {"weight_bits": bits, "act_bits": bits, "unit": "steps", "weight_delay": 0,
                      "act_delay": 0}}


def finalized(model_name: str, bits: int, seed: int = 0, batch: int = 8) -> tuple[nn.Module, int]:
    """The finalized model of a schedule run on random data, and the number of steps it took."""
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=10, in_channels=1, image_size=IMAGE)
    comp = Compressor(model, recipe(bits), torch.randn(2, 1, IMAGE, IMAGE))
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.01, momentum=0.9)
    comp.model.train()
    steps = 0
    while not comp.schedule_done:
        x, y = torch.randn(batch, 1, IMAGE, IMAGE), torch.randint(0, 10, (batch,))
        loss = F.cross_entropy(comp.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.step()
        steps += 1
    return comp.finalize(), steps


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without quantizers: raw weights, activation quantizers disabled.

    (Not ``parametrize.remove_parametrizations`` on the copy: it deletes the weight property from the
    parametrized class, which a ``deepcopy`` shares with the original.)
    """
    f = copy.deepcopy(model)
    for m in f.modules():
        if parametrize.is_parametrized(m, "weight"):
            raw = m.parametrizations["weight"].original
            m.__class__ = type(m).__bases__[0]  # the class parametrize subclassed
            del m._modules["parametrizations"]
            m.weight = nn.Parameter(raw.detach().clone(), requires_grad=raw.requires_grad)
        elif isinstance(m, ActQuantizer):
            m.enabled.fill_(False)
    return f.eval()


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (so that equality is bit equality: -0.0 != 0.0, NaN == NaN)."""
    return t.contiguous().view(torch.int32)


def time_rounds(fns: dict, x: torch.Tensor, rounds: int, iters: int) -> dict[str, list[tuple[float, float]]]:
    """Per function, ``rounds`` pairs (wall s, thread CPU s) of ``iters`` calls each, interleaved."""
    names = list(fns)
    out: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            for _ in range(2):
                fns[n](x)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                f = fns[n]
                c0, t0 = time.thread_time(), time.perf_counter()
                for _ in range(iters):
                    f(x)
                t1, c1 = time.perf_counter(), time.thread_time()
                out[n].append(((t1 - t0) / iters, (c1 - c0) / iters))
    return out


def summarize(times: dict[str, list[tuple[float, float]]]) -> dict:
    """Median latencies (ms) and the per-round ratios to ``float`` (median, min, max)."""
    res: dict = {}
    for k, idx in (("wall", 0), ("cpu", 1)):
        res[f"{k}_ms"] = {n: 1e3 * statistics.median(t[idx] for t in v) for n, v in times.items()}
        for n in ("quant", "uncached"):
            rs = [a[idx] / b[idx] for a, b in zip(times[n], times["float"])]
            res[f"{k}_ratio_{n}"] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters-batch1", type=int, default=20, help="forward passes per round at batch 1")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    command = " ".join(["python benchmarks/finalized_speed.py", *(sys.argv[1:] if argv is None else argv)])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info = {"machine": machine_info(), "python": platform.python_version(), "threads": 1,
            "cores": os.cpu_count(), "load_average_at_start": load, "command": command,
            "rounds": args.rounds, "sparsity": 0.5, "image": [1, IMAGE, IMAGE], "rows": []}
    print(f"# {command}\n# {info['machine']['cpu_class']} ({info['machine']['cpu']}), torch "
          f"{torch.__version__}, 1 thread, load average {load:.1f} at start", flush=True)
    for name in args.models:
        for bits in args.bits:
            quant, steps = finalized(name, bits)
            flt = float_copy(quant)

            def uncached(x, q=quant):
                with eval_cache(False):
                    return q(x)

            for batch in args.batches:
                x = torch.randn(batch, 1, IMAGE, IMAGE, generator=torch.Generator().manual_seed(batch))
                with torch.inference_mode():
                    same = torch.equal(bits_of(quant(x)), bits_of(uncached(x)))
                iters = args.iters_batch1 if batch == 1 else 1
                fns = {"float": flt, "quant": quant, "uncached": uncached}
                times = time_rounds(fns, x, args.rounds, iters)
                row = {"model": name, "bits": f"W{bits}A{bits}", "batch": batch, "schedule_steps": steps,
                       "iters_per_round": iters, "bit_identical": same, **summarize(times)}
                info["rows"].append(row)
                w, c, ms = row["wall_ratio_quant"], row["wall_ratio_uncached"], row["wall_ms"]
                print(f"{name} {row['bits']} batch {batch}: float {ms['float']:.2f} ms, finalized "
                      f"{ms['quant']:.2f} ms ({w['median']:.2f}x, {w['min']:.2f}-{w['max']:.2f}), "
                      f"before {ms['uncached']:.2f} ms ({c['median']:.2f}x); CPU-time ratio "
                      f"{row['cpu_ratio_quant']['median']:.2f}x; bit-identical {same}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finalized_speed.json").write_text(json.dumps(info, indent=1) + "\n")
    (args.out / "finalized_speed.md").write_text(markdown(info))
    return info


def markdown(info: dict) -> str:
    """The results as a markdown table (ratios: median over rounds, range in brackets)."""
    m = info["machine"]
    lines = [f"`{info['command']}`", "",
             f"CPU: {m['cpu_class']} ({m['cpu']}); torch {m['torch']}, 1 thread, {info['cores']} cores, load "
             f"average {info['load_average_at_start']:.1f} at start; {info['rounds']} interleaved rounds; "
             "ratios to the float model of the same round: median [min-max].", "",
             "| model | bits | batch | float ms | finalized ms | finalized / float "
             "| finalized / float, CPU time | before ms | before / float | bit-identical |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def r(d: dict) -> str:
        return f"{d['median']:.2f} [{d['min']:.2f}-{d['max']:.2f}]"

    for row in info["rows"]:
        ms = row["wall_ms"]
        lines.append(f"| {row['model']} | {row['bits']} | {row['batch']} | {ms['float']:.2f} | "
                     f"{ms['quant']:.2f} | {r(row['wall_ratio_quant'])} | {r(row['cpu_ratio_quant'])} | "
                     f"{ms['uncached']:.2f} | "
                     f"{r(row['wall_ratio_uncached'])} | {'yes' if row['bit_identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
