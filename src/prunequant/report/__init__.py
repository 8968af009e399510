"""Run reports: ``report.json`` (schema below), ``summary.md`` and PNG plots.

``report.json`` (``schema_version`` 1):

* ``prunequant_version``, ``config`` (the validated run configuration), ``data`` (name, source,
  split sizes, input shape), ``steps_per_epoch``, ``steps`` (dense / compress), ``timeline`` (steps
  at which pruning begins / the last mask froze / quantization begins / weights and activations
  start quantizing), ``timing`` (seconds of this process; with ``checkpoints_written`` when it
  wrote any and ``resumed_at_step`` for a resumed run), ``device``, ``threads``, ``machine`` (the
  CPU class and brand, its integer-kernel flags, the torch version: float results differ across
  CPU classes); ``processes`` only for a run of several processes (``world_size``, ``backend``,
  ``global_batch``, ``per_process_batch``, ``state_identical_on_all_ranks``: see
  :mod:`prunequant.parallel`);
* ``shrink_check``: the masked vs the physically smaller model on up to 2,000 test images
  (``samples``, ``samples_differing`` beyond float noise, ``max_abs_diff``, ``argmax_agreement``);
* ``phases``: ``dense``, ``pruned`` (when pruning ran: measured at the step the last mask froze, with
  no recovery), ``pruned_finetuned`` (the pruned model after its fine-tuning steps, just before the
  first quantizer turns on, when there are such steps) and ``final``, each with ``accuracy`` (test,
  %), ``val_accuracy``, ``params``, ``macs``, ``bops``, ``weight_mbit``, ``act_mbit``,
  ``memory_mbit``, ``density`` (accuracy % / Mbit), ``scale_bias_mbit`` and ``deploy_weight_mbit``
  (the float32 scales and biases a deployed model keeps beside its weights, and the sum: see
  :mod:`prunequant.metrics.measure`), ``weight_bits`` and ``act_bits`` (bit-widths in use; 32 =
  float);
* ``layers``: per pruned layer or channel group ``name`` (groups: ``group:<first producer>``),
  ``channels_before``, ``channels_after``, ``target_sparsity``, ``tied`` (depthwise convs that lose
  the same channels), ``members`` (a group's other producers; empty for a layer);
* ``skipped``: activations that were not pruned, with the reason;
* ``task``: ``name`` (``classification`` or ``restoration``, :mod:`prunequant.train.tasks`), ``metric``
  (the primary metric, a key of every phase: ``accuracy`` or ``psnr``), ``higher_is_better``, ``label``
  (axis / column label).

Image-restoration runs (``task.name`` ``restoration``: ``data.name`` ``sr_images`` or
``denoise_images``) differ in these places:

* each phase has ``psnr`` and ``ssim`` (test set, mean over its whole images; dB and SSIM on Y for
  super-resolution after cutting ``scale`` pixels off each side, on the denoised channels for
  denoising: :mod:`prunequant.metrics.image`), ``val_psnr`` and ``val_ssim`` (the validation image),
  ``per_image`` (test image -> [psnr, ssim]) instead of ``accuracy`` / ``val_accuracy``, and no
  ``density``; ``params`` ... ``deploy_weight_mbit`` are measured on one training-patch input
  (``data.input_shape``, ``[C, patch_size, patch_size]``; MACs and activation memory grow with the
  image's pixels);
* ``reference``: the model-free baseline on the same images: ``name`` (``bicubic x<scale>``, or
  ``noisy input`` for denoising), ``psnr``, ``ssim``, ``val_psnr``, ``per_image``;
* ``data``: ``name``, ``source``, ``task`` (``sr`` / ``denoise``), ``train`` (patches per epoch), ``val``
  and ``test`` (whole images), ``scale``, ``sigma`` (in [0, 1] units), ``border``, ``patch_size``,
  ``input_shape``, ``train_images`` / ``val_images`` / ``test_images`` (the photographs used) and
  ``degradation``; no ``num_classes``;
* ``shrink_check``: per test image, ``samples_differing`` beyond float noise, ``max_abs_diff`` and
  ``min_psnr_between`` (the lowest PSNR of the smaller model's output against the masked model's);
  no ``argmax_agreement``;
* ``figures``: ``["restoration.png"]``, a crop of the first test image: bicubic (or the noisy input),
  the dense model, the compressed model and the ground truth side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..utils import atomic_write, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1
PHASE_LABELS = {"dense": "dense FP32", "pruned": "pruned (no recovery)",
                "pruned_finetuned": "pruned + fine-tuned", "final": "pruned + quantized"}


def _fmt_bits(v: list[int]) -> str:
    return "FP32" if v == [32] else "/".join(str(b) if b != 32 else "FP" for b in v)


def _task(results: dict[str, Any]) -> dict[str, Any]:
    return results.get("task") or {"name": "classification", "metric": "accuracy", "higher_is_better": True,
                                   "label": "test accuracy (%)"}


def _phase_table(results: dict[str, Any]) -> list[str]:
    if _task(results)["name"] == "classification":
        lines = [
            "| phase | test acc % | params | MACs | BOPs | weights Mbit | acts Mbit | memory Mbit | "
            "density %/Mbit | W bits | A bits |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for key, ph in results["phases"].items():
            lines.append(
                f"| {PHASE_LABELS.get(key, key)} | {ph['accuracy']:.2f} | {ph['params']:,} | "
                f"{ph['macs']:,} | {ph['bops']:.3g} | {ph['weight_mbit']:.3f} | {ph['act_mbit']:.3f} | "
                f"{ph['memory_mbit']:.3f} | {ph['density']:.2f} | {_fmt_bits(ph['weight_bits'])} | "
                f"{_fmt_bits(ph['act_bits'])} |"
            )
        return lines
    d = results["data"]
    lines = [
        f"| phase | {_task(results)['label']} | test SSIM | val PSNR (dB) | params | MACs | BOPs | "
        "weights Mbit | acts Mbit | memory Mbit | W bits | A bits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    ref = results.get("reference")
    if ref:
        vp = "" if ref.get("val_psnr") is None else f"{ref['val_psnr']:.2f}"
        lines.append(f"| {ref['name']} (reference) | {ref['psnr']:.2f} | {ref['ssim']:.4f} | {vp} | "
                     "| | | | | | | |")
    for key, ph in results["phases"].items():
        vp = "" if ph.get("val_psnr") is None else f"{ph['val_psnr']:.2f}"
        lines.append(
            f"| {PHASE_LABELS.get(key, key)} | {ph['psnr']:.2f} | {ph['ssim']:.4f} | {vp} | "
            f"{ph['params']:,} | {ph['macs']:,} | {ph['bops']:.3g} | {ph['weight_mbit']:.4f} | "
            f"{ph['act_mbit']:.4f} | {ph['memory_mbit']:.4f} | {_fmt_bits(ph['weight_bits'])} | "
            f"{_fmt_bits(ph['act_bits'])} |"
        )
    shape = "x".join(str(v) for v in d.get("input_shape", []))
    lines += ["", f"MACs, BOPs and activation memory are per {shape} input (one training patch); they grow "
                  "with the image's pixels. PSNR / SSIM: mean over the test images "
                  f"({', '.join(d.get('test_images', []))}), border {d.get('border', 0)} cut off."]
    return lines


def summary_markdown(results: dict[str, Any]) -> str:
    """A readable summary: phase table, per-layer channels, skipped activations."""
    cfg = results.get("config", {})
    d = results["data"]
    mcfg = cfg.get("model", {})
    lines = [
        "# prunequant run summary",
        "",
        f"- model: `{mcfg.get('name', '?')}` (width {mcfg.get('width', '?')})",
        f"- data: `{d['name']}` from {d['source']} (train {d['train']}, val {d['val']}, test {d['test']})",
        f"- recipe: ordering `{cfg.get('recipe', {}).get('ordering', '?')}`; "
        f"steps/epoch {results['steps_per_epoch']}; dense steps {results['steps']['dense']}, "
        f"compression steps {results['steps']['compress']}",
        f"- time: {results['timing'].get('total_s', 0):.0f} s on {results['device']} "
        f"({results['threads']} threads)",
    ]
    procs = results.get("processes")
    if procs:
        same = "yes" if procs.get("state_identical_on_all_ranks") else "NO (see report.json)"
        lines.append(f"- processes: {procs['world_size']} ({procs['backend']}), global batch "
                     f"{procs['global_batch']} = {procs['per_process_batch']} per process; model and "
                     f"compression state identical on all ranks: {same}")
    mach = results.get("machine")
    if mach:
        cpu = mach.get("cpu") or "unknown CPU"
        lines.append(f"- measured on: {mach.get('cpu_class', '?')} ({cpu}), torch "
                     f"{mach.get('torch', '?')}; float training differs across CPU classes, so accuracies "
                     "from another class differ by a few tenths of a point")
    if d.get("degradation"):
        lines.append(f"- task: {_task(results)['name']} ({d['degradation']}); training patches "
                     f"{d['patch_size']}x{d['patch_size']}, {d['train']} per epoch from "
                     f"{', '.join(d.get('train_images', []))}; validation "
                     f"{', '.join(d.get('val_images', []))}")
    lines += [""] + _phase_table(results)
    phases = results["phases"]
    if "pruned" in phases:
        note = (f"\n\"pruned (no recovery)\" is measured at step {phases['pruned'].get('step', '?')}, the "
                "step the last mask froze, before any fine-tuning of the pruned network")
        if "pruned_finetuned" in phases:
            pf = phases["pruned_finetuned"]
            note += (f"; \"pruned + fine-tuned\" after {pf.get('finetune_steps', '?')} more steps, just "
                     "before the first quantizer turned on")
        lines += [note + "."]
    sc = results.get("shrink_check")
    if sc and sc.get("samples") and "argmax_agreement" not in sc:
        low = sc.get("min_psnr_between")
        lines += ["", f"Masked vs physically smaller model on {sc['samples']:,} test images: "
                      f"{sc['samples_differing']} differ beyond float noise (max abs diff "
                      f"{sc['max_abs_diff']:.3g}; lowest PSNR of one output against the other "
                      f"{'n/a' if low is None else format(low, '.1f')} dB). The two are the same function; "
                      "float32 sums in another order can move an activation that sits on a quantizer's "
                      "rounding boundary to the neighbouring code."]
    elif sc and sc.get("samples"):
        lines += ["", f"Masked vs physically smaller model on {sc['samples']:,} test images: "
                      f"{sc['samples_differing']} differ beyond float noise (max abs diff "
                      f"{sc['max_abs_diff']:.3g}), argmax agreement {100 * sc['argmax_agreement']:.2f} %. "
                      "The two are the same function; float32 sums in another order can move an activation "
                      "that sits on a quantizer's rounding boundary to the neighbouring code."]
    final = phases.get("final", {})
    if final.get("deploy_weight_mbit"):
        lines += ["", f"Memory follows the paper (b bits per weight and activation). Deployed, the final "
                      f"model's weights also need their float32 scales and biases: "
                      f"{final['weight_mbit']:.3f} + {final['scale_bias_mbit']:.3f} = "
                      f"{final['deploy_weight_mbit']:.3f} Mbit "
                      "(`prunequant export --format packed --fold-bn`)."]
    for fig in results.get("figures", []):
        lines += ["", f"![{fig}]({fig})"]
    if results.get("layers"):
        lines += [
            "",
            "## Channels per pruned layer",
            "",
            "| layer | before | after | target sparsity | tied / group members |",
            "|---|---:|---:|---:|---|",
        ]
        for r in results["layers"]:
            tied = ", ".join(list(r.get("members", [])) + list(r["tied"])) or ""
            lines.append(
                f"| `{r['name']}` | {r['channels_before']} | {r['channels_after']} | "
                f"{r['target_sparsity']:.2f} | {tied} |"
            )
    if results.get("skipped"):
        lines += ["", "## Activations not pruned", ""]
        lines += [f"- `{k}`: {v}" for k, v in results["skipped"].items()]
    return "\n".join(lines) + "\n"


def plot_channels(results: dict[str, Any], path: str | Path) -> None:
    """Bar chart of channels before / after per pruned layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = results.get("layers", [])
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 2), 4))
    xs = range(len(layers))
    ax.bar(xs, [r["channels_before"] for r in layers], color="#cccccc", label="before")
    ax.bar(xs, [r["channels_after"] for r in layers], color="#1f77b4", label="kept")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["name"] for r in layers], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("channels")
    ax.set_title("Channels kept per pruned layer")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def plot_accuracy_memory(results: dict[str, Any], path: str | Path) -> None:
    """The task's metric (test accuracy, or PSNR for image restoration) vs memory (Mbit, log scale) of
    the run's phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = _task(results)
    metric = task["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, ph in results["phases"].items():
        ax.scatter(ph["memory_mbit"], ph[metric], s=60)
        note = f"\n{ph['density']:.1f} %/Mbit" if "density" in ph else ""
        ax.annotate(
            f"{PHASE_LABELS.get(key, key)}{note}",
            (ph["memory_mbit"], ph[metric]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo = min(ph["memory_mbit"] for ph in results["phases"].values())
    hi = max(ph["memory_mbit"] for ph in results["phases"].values())
    ax.set_xlim(lo / 1.6, hi * 3.0)
    ax.margins(y=0.25)
    ax.set_xlabel("memory (Mbit, weights + activations, log scale)")
    ref = results.get("reference")
    if ref and ref.get(metric) is not None:
        ax.axhline(ref[metric], color="grey", linestyle="--", linewidth=1, label=f"{ref['name']} (no model)")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylabel(task["label"])
    ax.set_title("Accuracy vs memory" if metric == "accuracy" else f"{metric.upper()} vs memory")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``summary.md``, ``channels.png`` and ``accuracy_memory.png``."""
    from .. import __version__

    out = Path(out_dir)
    results = {"schema_version": SCHEMA_VERSION, "prunequant_version": __version__, **results}
    paths = {
        "report": atomic_write_json(out / "report.json", results),
        "summary": atomic_write_text(out / "summary.md", summary_markdown(results)),
    }
    if results.get("layers"):
        plot_channels(results, out / "channels.png")
        paths["channels_plot"] = out / "channels.png"
    plot_accuracy_memory(results, out / "accuracy_memory.png")
    paths["accuracy_memory_plot"] = out / "accuracy_memory.png"
    return paths


# ---------------------------------------------------------------------------- ranking analysis
SECTION_BEGIN = "<!-- prunequant analyze: begin -->"
SECTION_END = "<!-- prunequant analyze: end -->"


def ranking_summary_markdown(analysis: dict[str, Any], image: str | None = None) -> str:
    """The ``summary.md`` section of ``prunequant analyze``: per measure and preceding sparsity, the mean
    Kendall tau, edit distance and kept overlap, and the one-sentence reading."""
    from ..train.analyze import LABELS

    d = analysis.get("data", {})
    sites = analysis["sites"]
    n_pred = sum(1 for s in sites if s["predecessor"] is not None)
    lines = [
        SECTION_BEGIN,
        "## Ranking analysis (`prunequant analyze`)",
        "",
        f"Each layer's channel ranking measured with the layer before it dense vs pruned at s (its mask "
        f"chosen by the same measure), on the first {d.get('calibration_images', '?'):,} training images "
        f"(BatchNorm in {analysis.get('mode', '?')} mode); {n_pred} of {len(sites)} pruned layers have a "
        "preceding layer. tau: Kendall's tau-a against the dense ranking (1 = same order); edit: "
        "Levenshtein distance between the rank sequences (channels; / n: over the layer's channel "
        "count); overlap: share of the channels kept at the layer's own target that stay kept.",
        "",
        "| measure | preceding sparsity | mean tau | min tau | mean edit | mean edit / n | mean overlap |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    for m in analysis["measures"]:
        for s in analysis["sparsities"]:
            r = analysis["summary"][m][f"{s:g}"]
            lines.append(f"| {LABELS.get(m, m)} | {100 * s:g} % | {f(r['mean_tau'], '.3f')} | "
                         f"{f(r['min_tau'], '.3f')} | {f(r['mean_edit_distance'], '.1f')} | "
                         f"{f(r['mean_edit_distance_norm'], '.2f')} | {f(r['mean_kept_overlap'], '.2f')} |")
    lines += ["", analysis.get("reading", "")]
    if image:
        lines += ["", f"![Kendall tau per layer and preceding sparsity]({image})"]
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def put_section(path: str | Path, section: str) -> Path:
    """Append ``section`` to the markdown file ``path`` (atomically), replacing an earlier section
    between the same markers; creates the file when missing."""
    p = Path(path)
    text = p.read_text() if p.is_file() else ""
    a, b = text.find(SECTION_BEGIN), text.find(SECTION_END)
    if a >= 0 and b > a:
        text = text[:a] + section + text[b + len(SECTION_END):].lstrip("\n")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    return atomic_write_text(p, text)


def plot_ranking_heatmap(analysis: dict[str, Any], path: str | Path) -> None:
    """Kendall tau heatmap: rows the pruned layers, columns the preceding layer's sparsity, one panel
    per measure (grey: no preceding layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..train.analyze import LABELS

    measures, sps, sites = analysis["measures"], analysis["sparsities"], analysis["sites"]
    fig, axes = plt.subplots(1, len(measures), squeeze=False,
                             figsize=(1.2 + 2.4 * len(measures), 1.6 + 0.32 * len(sites)))
    im = None
    for ax, m in zip(axes[0], measures):
        vals = np.full((len(sites), len(sps)), np.nan)
        for i, site in enumerate(sites):
            pre = site["measures"][m]["preceding"]
            for j, s in enumerate(sps):
                t = pre[f"{s:g}"]["tau"] if pre else None
                vals[i, j] = np.nan if t is None else t
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")
        im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
        for i in range(len(sites)):
            for j in range(len(sps)):
                ax.text(j, i, "n/a" if np.isnan(vals[i, j]) else f"{vals[i, j]:.2f}", ha="center",
                        va="center", fontsize=7)
        ax.set_xticks(range(len(sps)))
        ax.set_xticklabels([f"{100 * s:g} %" for s in sps], fontsize=8)
        ax.set_xlabel("preceding layer pruned")
        ax.set_title(LABELS.get(m, m), fontsize=10)
        ax.set_yticks(range(len(sites)))
        ax.set_yticklabels([s["name"] for s in sites] if ax is axes[0][0] else [], fontsize=7)
    fig.suptitle("Kendall tau vs the dense ranking", fontsize=10)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="tau")
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png", bbox_inches="tight"))
    plt.close(fig)
