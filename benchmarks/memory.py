"""Memory of one compression training step against plain FP32 training, and of the statistics per layer.

Two measurements, written to ``benchmarks/results/memory/`` (``memory.json`` and ``memory.md``):

1. **Peak memory of one training step** for each model, batch size and phase:

   * ``fp32``: the plain network, ``model(x)``, cross-entropy, backward, SGD-momentum step;
   * ``prune``: the :class:`prunequant.Compressor` step in the layerwise pruning window (every mask
     applied, the first one gathering its A-L1 statistic; no quantizer on yet);
   * ``qat``: every mask frozen at 50 % and every weight and activation quantizer on and gathering
     (``quant.weight_bits = act_bits = 4`` everywhere, batch min / max ranges);
   * ``qat_paper`` / ``qat_p999``: the same QAT state with the recipes of
     ``recipes/fmnist_resnet20_w4a4.yaml`` (8-bit network input and classifier) and
     ``recipes/fmnist_resnet20_w4a4_p999.yaml`` (99.9th-percentile activation ranges).

   Each configuration runs in a fresh Python process on real Fashion-MNIST batches (random tensors
   only when the dataset is missing; the output then says so), one torch thread. One step is
   ``opt.zero_grad(set_to_none=True)`` followed by the measured part: forward, loss, backward,
   ``opt.step()`` and ``comp.step()``. What is reported is the step's peak *above* the memory held
   between steps (parameters, momentum, buffers, the batch), i.e. activations saved for backward,
   gradients and temporaries. Two independent methods, after warm-up steps:

   * ``alloc``: every allocation and free of PyTorch's CPU allocator during the step, as
     ``torch.profiler`` (``profile_memory=True``) records them with the allocator's running total;
     the peak of that total minus its value when the step starts. Exact and deterministic (no
     sampling); it sees every tensor, including temporaries inside operators, but not memory that
     libraries allocate past PyTorch's allocator.
   * ``rss``: the process's resident-set high-water mark (``VmHWM``, reset through
     ``/proc/self/clear_refs``) minus the resident set when the step starts, after ``malloc_trim``
     and with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that large tensors are returned to
     the system when freed. Page-granular and sees everything the process touches; a cross-check.

   With CUDA available each configuration also runs on the GPU and reports
   ``torch.cuda.max_memory_allocated()`` above ``memory_allocated()`` at the step's start.

2. **Compression state per layer**: the bytes of the buffers the instrumented model adds (channel mask
   ``mask`` / ``stat_sum`` / ``stat_count`` / flags, activation quantizer ``min_sum`` / ``max_sum`` /
   ``stat_count`` / flags, weight quantizer ``stat_sum`` / ``stat_count`` / flag), counted exactly from
   ``comp.model.state_dict()``, next to the bytes of the layer's weights.

    .venv/bin/python benchmarks/memory.py                                  # everything (~25 min, 1 core)
    .venv/bin/python benchmarks/memory.py --models resnet20 --batches 32   # a quick look
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunequant import Compressor  # noqa: E402
from prunequant.config import RunConfig  # noqa: E402
from prunequant.export.cpu import machine_info  # noqa: E402
from prunequant.models import build_model  # noqa: E402
from prunequant.prune.mask import ChannelMask  # noqa: E402
from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "memory"
PHASES = ("fp32", "prune", "qat", "qat_paper", "qat_p999")
#: the recipe of the ``prune`` and ``qat`` phases (lengths in steps: the pruning window is open from step 0)
RECIPE: dict[str, Any] = {
    "prune": {"sparsity": 0.5, "unit": "steps", "start": 0, "interval": 5, "refresh": 5},
    "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 0, "act_delay": 0},
}
SHIPPED = {"qat_paper": ROOT / "recipes" / "fmnist_resnet20_w4a4.yaml",
           "qat_p999": ROOT / "recipes" / "fmnist_resnet20_w4a4_p999.yaml"}
#: Fashion-MNIST training images per epoch in the shipped recipes (54,000 after the 10 % validation split)
TRAIN_IMAGES = 54000
MMAP_THRESHOLD = 65536


# ---------------------------------------------------------------------------------------------- setup
def recipe_for(phase: str, batch: int) -> tuple[dict[str, Any] | Any, int | None]:
    """``(recipe, steps_per_epoch)`` of a compression phase."""
    if phase in SHIPPED:
        return RunConfig.from_yaml(SHIPPED[phase]).recipe, math.ceil(TRAIN_IMAGES / batch)
    return RECIPE, None


def make_model(name: str, width: float) -> nn.Module:
    """A freshly initialised model for 28x28 single-channel images, 10 classes (seed 0)."""
    torch.manual_seed(0)
    return build_model(name, num_classes=10, in_channels=1, image_size=28, width=width)


def jump_to_qat(comp: Compressor) -> None:
    """Put ``comp`` where QAT runs: every mask frozen at its target sparsity (channels drawn at
    random: the memory does not depend on which), the step counter past the schedule, every weight
    and activation quantizer on. The next training step gives the activation quantizers ranges."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, (site, m) in enumerate(zip(comp.plan.sites, comp._masks)):
            m.mask.copy_(comp.mask_for(i, comp._sparsity[i], torch.rand(site.channels, generator=g)))
            m.collecting.fill_(False)
            m.frozen.fill_(True)
        comp.model.pq_step.fill_(comp.total_steps_hint + 1)
        for wq in comp._wq.values():
            wq.enabled.fill_(True)
        for aq in comp._aq:
            aq.enabled.fill_(True)


def build(model_name: str, width: float, phase: str, example: Tensor,
          batch: int) -> tuple[nn.Module, Compressor | None]:
    """The network a phase trains and its Compressor (``None`` for ``fp32``)."""
    model = make_model(model_name, width)
    if phase == "fp32":
        return model, None
    recipe, spe = recipe_for(phase, batch)
    comp = Compressor(model, recipe, example, steps_per_epoch=spe)
    if phase != "prune":
        jump_to_qat(comp)
    return comp.model, comp


def load_batches(n: int, seed: int = 0) -> tuple[Tensor, Tensor, str]:
    """``n`` normalized Fashion-MNIST training images and labels, and where they came from; random
    tensors (said in the source) when the dataset is missing."""
    from prunequant.data import load_dataset
    from prunequant.data.errors import DatasetError

    try:
        data = load_dataset("fashion_mnist", val_fraction=0.1, seed=seed, train_subset=n)
    except DatasetError as e:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g),
                f"RANDOM TENSORS (Fashion-MNIST missing: {str(e).splitlines()[0][:120]})")
    xs, ys = zip(*(data.train[i] for i in range(min(n, len(data.train)))))
    return torch.stack(xs).contiguous(), torch.tensor(ys, dtype=torch.int64), f"Fashion-MNIST ({data.source})"


# ------------------------------------------------------------------------------------ measurement
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_peak_above(fn: Any) -> int | None:
    """Bytes by which the resident set's high-water mark rose above the resident set while ``fn()``
    ran (``None`` where ``/proc/self/clear_refs`` cannot reset it: not Linux, or refused)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    base = _status_kb("VmRSS")
    fn()
    hwm = _status_kb("VmHWM")
    if base is None or hwm is None:
        return None
    return (hwm - base) * 1024


def alloc_peak_above(fn: Any, warmup: Any) -> tuple[int, dict[str, int]]:
    """``(peak, info)``: the peak of PyTorch's CPU allocator total while ``fn()`` ran, minus the total
    when it started, from the allocation events of ``torch.profiler`` (``warmup()`` runs first, inside
    the profiler, so that the tensors ``fn`` frees were allocated while it recorded)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        warmup()
        with record_function("pq_measured_step"):
            fn()
    events: list[Any] = []
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    window = None
    while todo:
        e = todo.pop()
        todo.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append(e)
        elif e.name == "pq_measured_step":
            window = (e.start_time_ns, e.end_time_ns)
    if window is None:
        raise RuntimeError("the profiler recorded no measured step")
    cpu = sorted((e for e in events if e.extra_fields.device.type == "cpu"), key=lambda e: e.start_time_ns)
    other = sum(1 for e in events if e.extra_fields.device.type != "cpu")
    before = [e for e in cpu if e.start_time_ns < window[0]]
    inside = [e for e in cpu if window[0] <= e.start_time_ns <= window[1]]
    if not inside:
        raise RuntimeError("no allocation inside the measured step")
    base = before[-1].extra_fields.total_allocated if before else (
        inside[0].extra_fields.total_allocated - inside[0].extra_fields.alloc_size)
    peak = max(e.extra_fields.total_allocated for e in inside)
    end = inside[-1].extra_fields.total_allocated
    allocated = sum(e.extra_fields.alloc_size for e in inside if e.extra_fields.alloc_size > 0)
    return max(0, peak - base), {"events": len(inside), "non_cpu_events": other, "allocated_bytes": allocated,
                                 "left_after_step": end - base}


def saved_for_backward(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, int]:
    """Bytes of the distinct tensors autograd saves for backward in one forward, by dtype (parameters
    and the batch itself left out): what the step holds at the end of its forward."""
    skip = {p.untyped_storage().data_ptr() for p in net.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.nbytes():
            seen[s.data_ptr()] = (s.nbytes(), str(t.dtype).replace("torch.", ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(net(x), y)
    del loss
    out: dict[str, int] = {}
    for nbytes, dt in seen.values():
        out[dt] = out.get(dt, 0) + nbytes
    return out


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one (model, batch, phase, device) configuration in this (fresh) process."""
    torch.set_num_threads(1)
    xs, ys = torch.load(args.batches_file, weights_only=True)
    dev = torch.device(args.device)
    b = args.batch
    n_batches = xs.shape[0] // b
    # copies, so that each batch is its own storage (the saved-tensor count tells the labels apart)
    batches = [(xs[i * b:(i + 1) * b].to(dev, copy=True), ys[i * b:(i + 1) * b].to(dev, copy=True))
               for i in range(n_batches)]
    del xs, ys
    net, comp = build(args.model, args.width, args.phase, batches[0][0][:8].cpu(), b)
    net.to(dev).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    it = [0]

    def step_body() -> None:
        x, y = batches[it[0] % n_batches]
        it[0] += 1
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        if comp is not None:
            comp.step()
        del loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        step_body()

    res: dict[str, Any] = {"model": args.model, "width": args.width, "batch": b, "phase": args.phase,
                           "device": args.device}
    for _ in range(args.warmup):
        step()
    res["saved_for_backward"] = saved_for_backward(net, *batches[0])
    opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step_body()
        torch.cuda.synchronize()
        res["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        res["rss_peak_bytes"] = rss_peak_above(step_body)
        opt.zero_grad(set_to_none=True)

        def warm() -> None:  # one step inside the profiler, its gradients freed before the measured one
            step()
            opt.zero_grad(set_to_none=True)

        res["alloc_peak_bytes"], res["alloc_info"] = alloc_peak_above(step_body, warmup=warm)
    res["params_bytes"] = sum(p.numel() * p.element_size() for p in net.parameters())
    res["momentum_bytes"] = sum(s["momentum_buffer"].numel() * s["momentum_buffer"].element_size()
                                for s in opt.state.values() if s.get("momentum_buffer") is not None)
    res["buffers_bytes"] = sum(t.numel() * t.element_size() for t in net.buffers())
    res["steps"] = it[0]
    if comp is not None:
        res["comp_step_count"] = comp.step_count
    return res


def run_worker(cfg: dict[str, Any], batches_file: Path) -> dict[str, Any]:
    """Run :func:`worker` for ``cfg`` in a fresh interpreter and return its result."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "res.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batches-file", str(batches_file),
               "--result", str(out), "--model", cfg["model"], "--width", str(cfg["width"]),
               "--batch", str(cfg["batch"]), "--phase", cfg["phase"], "--device", cfg["device"],
               "--warmup", str(cfg["warmup"])]
        path = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
               "PYTHONPATH": os.pathsep.join(q for q in path if q)}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"worker {cfg} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------- statistics bytes
def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def stats_memory(model_name: str, width: float, recipe: Any = None) -> dict[str, Any]:
    """The compression state the instrumented model adds, per conv / linear layer: bytes of its weight
    quantizer, of the activation quantizer on its input and of the channel mask on its output, the
    float64 running statistics among them, next to the bytes of the layer's own parameters. Exact
    counts from ``comp.model.state_dict()``."""
    model = make_model(model_name, width)
    plain = {k: _nbytes(v) for k, v in model.state_dict().items()}
    comp = Compressor(model, RECIPE if recipe is None else recipe, torch.zeros(2, 1, 28, 28),
                      steps_per_epoch=100)
    plan = comp.plan
    sd = comp.model.state_dict()
    sites = {s.name: s for s in plan.sites}
    owner: dict[str, tuple[str, str]] = {}  # module path prefix -> (layer, kind)
    for name, info in plan.layers.items():
        owner[f"{name}.parametrizations.weight.0."] = (name, "weight_quant")
        if info.act_quant:  # one quantizer may feed several layers (conv1 and shortcut): the first gets it
            owner.setdefault(f"{info.act_quant}.", (name, "act_quant"))
        if info.output_site and info.output_site in sites:
            owner[f"{sites[info.output_site].mask}."] = (name, "mask")
    rows: dict[str, dict[str, Any]] = {}
    for name in plan.layers:
        mod = comp.model.get_submodule(name)
        params = {k: v for k, v in mod.named_parameters()}
        w = next(v for k, v in params.items() if k.endswith("weight") or k.endswith("original"))
        rows[name] = {"layer": name, "weight_shape": list(w.shape), "weight_bytes": _nbytes(w),
                      "param_bytes": sum(_nbytes(v) for v in params.values()),
                      "weight_quant": 0, "act_quant": 0, "mask": 0, "float64_stats": 0, "buffers": []}
    model_level: dict[str, int] = {}
    compression_keys = [k for k in sd if k not in plain or k == "pq_step"]
    for key in compression_keys:
        t = sd[key]
        if t.dtype == torch.float32 and key.endswith(".original"):
            continue  # the weight itself (renamed by the parametrization), not compression state
        hit = next(((p, o) for p, o in owner.items() if key.startswith(p)), None)
        if hit is None:
            model_level[key] = _nbytes(t)
            continue
        layer, kind = hit[1]
        r = rows[layer]
        r[kind] += _nbytes(t)
        r["buffers"].append(key)
        if t.dtype == torch.float64:
            r["float64_stats"] += _nbytes(t)
    for r in rows.values():
        r["total"] = r["weight_quant"] + r["act_quant"] + r["mask"]
    per_layer = list(rows.values())
    total = sum(r["total"] for r in per_layer) + sum(model_level.values())
    return {
        "model": model_name, "width": width, "layers": per_layer, "model_level": model_level,
        "total_bytes": total,
        "float64_stats_bytes": sum(r["float64_stats"] for r in per_layer)
        + sum(v for k, v in model_level.items() if sd[k].dtype == torch.float64),
        "weight_bytes": sum(r["weight_bytes"] for r in per_layer),
        "param_bytes": sum(_nbytes(p) for p in comp.model.parameters()),
        "state_dict_bytes": sum(_nbytes(v) for v in sd.values()),
        "counts": {"masks": sum(isinstance(m, ChannelMask) for m in comp.model.modules()),
                   "act_quantizers": sum(isinstance(m, ActQuantizer) for m in comp.model.modules()),
                   "weight_quantizers": sum(isinstance(m, WeightQuantizer) for m in comp.model.modules())},
    }


# -------------------------------------------------------------------------------------------- tables
def fmt_bytes(b: float | None) -> str:
    """Human-readable bytes (decimal units)."""
    if b is None:
        return "n/a"
    if abs(b) >= 1e6:
        return f"{b / 1e6:.1f} MB"
    if abs(b) >= 1e3:
        return f"{b / 1e3:.1f} kB"
    return f"{b:.0f} B"


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b`` is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's peaks as ratios to the ``fp32`` row of the same model, width, batch and device."""
    base = {(r["model"], r["width"], r["batch"], r["device"]): r for r in rows if r["phase"] == "fp32"}
    for r in rows:
        f = base.get((r["model"], r["width"], r["batch"], r["device"]))
        for k in ("alloc_peak_bytes", "rss_peak_bytes", "cuda_peak_bytes"):
            if k in r:
                r[k.replace("_bytes", "_ratio")] = ratio(r[k], f.get(k) if f else None)


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def table(rows: list[dict[str, Any]], stats: list[dict[str, Any]], machine: dict[str, Any], cmd: str,
          source: str) -> str:
    """The markdown report: the peak table, then the statistics per layer and their totals."""
    cuda = any("cuda_peak_bytes" in r for r in rows)
    lines = [f"Measured on {machine.get('cpu_class', '?')} ({machine.get('cpu', '?')}), torch "
             f"{machine.get('torch', torch.__version__)}, one torch thread; command: `{cmd}`. "
             f"Data: {source}.", "",
             "Peak memory of one training step above what is held between steps (activations saved for "
             "backward, gradients, temporaries), and as a ratio to the FP32 step of the same model and "
             "batch. `alloc`: PyTorch CPU allocator (torch.profiler allocation events); `rss`: resident-set "
             "high-water mark. `saved`: tensors autograd keeps for backward after the forward.", "",
             "| model | batch | phase | alloc peak | alloc vs FP32 | rss peak | rss vs FP32 "
             "| saved (float32) | saved (bool) |" + (" cuda peak | cuda vs FP32 |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else "")]
    for r in rows:
        if r["device"] != "cpu":
            continue
        c = next((q for q in rows if q["device"] == "cuda" and (q["model"], q["batch"], q["phase"])
                  == (r["model"], r["batch"], r["phase"])), None)
        saved = r.get("saved_for_backward", {})
        lines.append(f"| {r['model']} | {r['batch']} | {r['phase']} | {fmt_bytes(r['alloc_peak_bytes'])} | "
                     f"{_r(r.get('alloc_peak_ratio'))} | {fmt_bytes(r['rss_peak_bytes'])} | "
                     f"{_r(r.get('rss_peak_ratio'))} | {fmt_bytes(saved.get('float32', 0))} | "
                     f"{fmt_bytes(saved.get('bool', 0))} |"
                     + (f" {fmt_bytes(c['cuda_peak_bytes']) if c else 'n/a'} | "
                        f"{_r(c.get('cuda_peak_ratio')) if c else 'n/a'} |" if cuda else ""))
    held = [r for r in rows if r["device"] == "cpu" and r["batch"] == rows[0]["batch"]]
    lines += ["", "Held between steps (exact, any batch): parameters, SGD momentum, buffers.", "",
              "| model | phase | parameters | momentum | buffers |", "|---|---|---|---|---|"]
    for r in held:
        lines.append(f"| {r['model']} | {r['phase']} | {fmt_bytes(r['params_bytes'])} | "
                     f"{fmt_bytes(r['momentum_bytes'])} | {fmt_bytes(r['buffers_bytes'])} |")
    for s in stats:
        lines += ["", f"Compression state of {s['model']} (width {s['width']}), bytes per conv / linear "
                  "layer (exact, from `comp.model.state_dict()`): weight quantizer, activation quantizer on "
                  "the layer's input (one quantizer read by two layers is counted at the first), channel "
                  "mask on its output; `float64` = the running statistics among them.",
                  "", "| layer | weight shape | weight bytes | weight quant | act quant | mask "
                  "| float64 stats | total | total / weight |", "|---|---|---|---|---|---|---|---|---|"]
        for r in s["layers"]:
            lines.append(f"| {r['layer']} | {'x'.join(map(str, r['weight_shape']))} | {r['weight_bytes']} | "
                         f"{r['weight_quant']} | {r['act_quant']} | {r['mask']} | {r['float64_stats']} | "
                         f"{r['total']} | {r['total'] / r['weight_bytes']:.1%} |")
        ml = sum(s["model_level"].values())
        lines.append(f"| (model: {', '.join(s['model_level'])}) | | | | | | | {ml} | |")
        lines.append(f"| **total** | | {s['weight_bytes']} | {sum(r['weight_quant'] for r in s['layers'])} | "
                     f"{sum(r['act_quant'] for r in s['layers'])} | {sum(r['mask'] for r in s['layers'])} | "
                     f"{s['float64_stats_bytes']} | {s['total_bytes']} | "
                     f"{s['total_bytes'] / s['weight_bytes']:.1%} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 128, 512])
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=2, help="training steps before the measured ones")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: also measure on CUDA when it is available; cuda: insist on it; cpu: CPU only")
    ap.add_argument("--out", type=Path, default=OUT)
    # worker mode (one configuration, run by main in a fresh process)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batches-file", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.worker:
        a.device = a.device if a.device != "auto" else "cpu"
        Path(a.result).write_text(json.dumps(worker(a)))
        return 0
    if a.warmup < 1:
        raise SystemExit("--warmup must be at least 1")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    devices = ["cpu"] + (["cuda"] if a.device != "cpu" and torch.cuda.is_available() else [])
    per_run = a.warmup + 4  # warm-up, the rss step, the profiler's warm-up and measured step
    xs, ys, source = load_batches(max(a.batches) * per_run)
    print(f"data: {source}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        bf = Path(d) / "batches.pt"
        torch.save((xs, ys), bf)
        del xs, ys
        for model in a.models:
            for b in a.batches:
                for phase in a.phases:
                    for dev in devices:
                        t = time.time()
                        cfg = {"model": model, "width": a.width, "batch": b, "phase": phase, "device": dev,
                               "warmup": a.warmup}
                        r = run_worker(cfg, bf)
                        rows.append(r)
                        peak = r.get("alloc_peak_bytes", r.get("cuda_peak_bytes"))
                        print(f"{model} b{b} {phase} {dev}: peak {fmt_bytes(peak)} (rss "
                              f"{fmt_bytes(r.get('rss_peak_bytes'))}) {time.time() - t:.0f} s", flush=True)
    add_ratios(rows)
    stats = [stats_memory(m, a.width) for m in a.models]
    for s in stats:  # the shipped recipes add the same buffers (their per-layer bits change no shape)
        s["total_bytes_shipped_recipes"] = {
            k: stats_memory(s["model"], a.width, recipe_for(k, 128)[0])["total_bytes"]
            for k in SHIPPED if k in a.phases}
    machine = machine_info()
    cmd = "python " + " ".join(["benchmarks/memory.py", *(argv if argv is not None else sys.argv[1:])])
    (a.out / "memory.json").write_text(json.dumps({"machine": machine, "command": cmd.strip(), "data": source,
                                                   "rows": rows, "stats": stats}, indent=1))
    md = table(rows, stats, machine, cmd.strip(), source)
    (a.out / "memory.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
