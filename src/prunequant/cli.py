"""Command line: ``prunequant run [--config recipe.yaml] [--out DIR] [--set key=value ...]``.

Also ``prunequant export RUN_DIR`` and ``prunequant analyze RUN_DIR`` (the ranking analysis).
``run`` with no arguments runs the default run (``prunequant.config.default_config()``, which is
``RunConfig()``); a ``--config`` file changes exactly the fields it names.
Configuration problems print one clear message (the field and what is allowed) and exit with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import RESTORATION_DATA, RunConfig
from .errors import PrunequantError
from .parallel import env_world_size
from .recipe import RecipeError, load_yaml


def _rank() -> int:
    """This process's rank as the launcher set it (0 when not under torchrun)."""
    r = os.environ.get("RANK", "0")
    return int(r) if r.strip().isdigit() else 0


def _set(data: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {dotted}: '{k}' is not a section")
        cur = nxt
    try:
        cur[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid"
        raise RecipeError(f"--set {dotted}={raw}: the value is not valid YAML ({first}); quote strings "
                          "and write lists as [a, b]") from None


def _load_config_file(config: str) -> dict[str, Any]:
    try:
        return load_yaml(config)
    except UnicodeDecodeError:
        raise RecipeError(f"--config {config}: not a text (UTF-8) file; pass a YAML run configuration "
                          "such as recipes/fmnist_resnet20_w4a4.yaml") from None
    except OSError as e:
        raise RecipeError(f"--config {config}: cannot be read ({e.strerror})") from None


def build_config(config: str | None, overrides: list[str], base: dict[str, Any] | None = None) -> RunConfig:
    """The run configuration: the file (or ``base``, or the embedded default) with ``--set`` overrides
    applied."""
    # one set of defaults: RunConfig's field defaults
    data = _load_config_file(config) if config else (base or {})
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value (e.g. recipe.prune.sparsity=0.75), got {item!r}")
        k, v = item.split("=", 1)
        _set(data, k.strip(), v)
    return RunConfig.from_dict(data, where=config or "default recipe")


def cmd_run(args: argparse.Namespace) -> int:
    """``prunequant run``; ``--resume OUT`` continues an interrupted run with the configuration stored in
    its folder, ``--overwrite`` replaces the run a folder holds. Under ``torchrun`` the processes run one
    job (:mod:`prunequant.parallel`); rank 0 prints and writes."""
    from .runfolder import check_out_dir
    from .train.trainer import read_run_config, run_and_report

    if args.resume is not None:
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            raise RecipeError(f"--out {args.out} and --resume {args.resume} name different folders; --resume "
                              "continues the run in its own folder (drop --out)")
        out = check_out_dir(args.resume, resume=True, overwrite=args.overwrite)
        # The folder's configuration (--set applies to it); one that changes it is refused by run().
        stored = read_run_config(out)
        cfg = build_config(args.config, args.set or [], base=stored.to_dict()) if (args.config or args.set) \
            else stored
    else:
        cfg = build_config(args.config, args.set or [])
        out = Path(args.out if args.out is not None else "runs/latest")
    if args.no_progress:
        cfg.train.progress = False
    verb = "resuming" if args.resume is not None else "->"
    main = _rank() == 0
    world = env_world_size()
    procs = f" ({world} processes)" if world > 1 else ""
    if main:
        print(f"prunequant {__version__}: {cfg.model.name} on {cfg.data.name} {verb} {out}{procs}",
              flush=True)
    _, paths = run_and_report(cfg, out, resume=args.resume is not None, overwrite=args.overwrite)
    if not main:
        return 0
    print((out / "summary.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


EXPORT_FILES = {"qdq": "model.qdq.onnx", "qonnx": "model.qonnx.onnx", "packed": "model.pqpack"}


def cmd_export(args: argparse.Namespace) -> int:
    """``prunequant export RUN_DIR --format qdq|qonnx|packed``: export a finished run's model. The run
    folder is held (``run.lock``) while it is read and written."""
    with contextlib.ExitStack() as held:
        return _export(args, held)


def _export(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    import torch

    from .graph.persist import load_pruned
    from .models import build_model

    run_dir = Path(args.run_dir)
    report = run_dir / "report.json"
    if not report.is_file():
        raise RecipeError(f"{run_dir}: no report.json here; pass the --out folder of a finished "
                          "`prunequant run`")
    from .runfolder import RunLock

    lock = RunLock(run_dir, "export")
    lock.acquire(lambda m: print(m, file=sys.stderr))
    held.callback(lock.release)
    files = _verify_run_for_export(run_dir)
    out = Path(args.output) if args.output else run_dir / EXPORT_FILES[args.format]
    _check_export_output(out, run_dir, files)
    cfg, (c, h, w), num_classes = _read_report(report)
    try:
        if num_classes is None:  # image restoration: the input shape is one training patch
            from .models import build_restoration_model

            base = build_restoration_model(cfg.model.name, in_channels=c, scale=cfg.data.scale or 3
                                           if cfg.data.name == "sr_images" else 1, width=cfg.model.width)
        else:
            base = build_model(cfg.model.name, num_classes=num_classes, in_channels=c, image_size=h,
                               width=cfg.model.width)
    except ValueError as e:
        raise RecipeError(f"{report}: model {cfg.model.name} cannot be built for input {[c, h, w]} "
                          f"({e})") from None
    x = torch.zeros(1, c, h, w)
    model = load_pruned(base, run_dir / "model", x).eval()
    from . import export as ex

    if args.check and args.format != "qdq":
        raise RecipeError("--check runs the QDQ file in ONNX Runtime; use it with --format qdq")
    if args.format == "packed":
        path = ex.save_packed(model, out, example_input=x, fold_bn=args.fold_bn)
    elif args.fold_bn:
        path = ex.export_onnx(model, x, out, format=args.format, fold_bn=True)
    else:
        path = ex.export_onnx(model, x, out, format=args.format)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if args.check:  # ONNX Runtime (default settings, this CPU) vs PyTorch on the run's test set
        from .export.check import check_run, format_check

        print(format_check(check_run(cfg, model, path, fold_bn=args.fold_bn)))
    if args.format == "packed":
        from .graph.ops import NORM_TYPES
        from .metrics.measure import measure

        m = measure(model, x)
        weight_bytes = m.weight_mbit * 1e6 / 8
        deploy_bytes = m.deploy_weight_mbit * 1e6 / 8
        rep = ex.packed_size_report(path)
        print(f"weight memory (measure): {weight_bytes:,.0f} bytes of b-bit weights + "
              f"{deploy_bytes - weight_bytes:,.0f} bytes of float32 scales and biases (folded form) = "
              f"{deploy_bytes:,.0f} bytes; file overhead beyond the b-bit weights "
              f"{100 * (rep['total'] - weight_bytes) / weight_bytes:.1f} %, "
              f"beyond weights + scales and biases {100 * (rep['total'] / deploy_bytes - 1):.1f} % "
              f"(scales {rep['weight_scales']:,}, "
              f"activation parameters {rep['activation_params']:,}, other tensors {rep['other_tensors']:,}, "
              f"record {rep['record']:,}, header {rep['header']} bytes)")
        if not args.fold_bn and any(isinstance(mod, NORM_TYPES) for mod in model.modules()):
            print("BatchNorm is stored unfolded (4 float32 per channel); --fold-bn stores the deployment "
                  "form (one bias per channel)")
    return 0


def _verify_run_for_export(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Check the run folder's manifest and every file it lists before reading any of them."""
    from .runfolder import read_manifest, verify_run

    files = read_manifest(run_dir)
    if files is not None and "report.json" in files and "model/pruning.json" not in files:
        raise RecipeError(f"{run_dir}: no model/ in this run (its recipe pruned nothing); export needs a "
                          "run whose recipe prunes and quantizes")
    if files is None and not (run_dir / "model" / "pruning.json").is_file():
        raise RecipeError(f"{run_dir}: no model/ folder (the run pruned nothing, or did not finish); "
                          "export needs a run whose recipe prunes and quantizes")
    return verify_run(run_dir, required=("report.json", "model/pruning.json", "model/weights.pt"))


def _check_export_output(out: Path, run_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    """``--output`` must be a file path that clobbers nothing of the run."""
    from .runfolder import MANIFEST

    if out.is_dir():
        raise RecipeError(f"--output {out}: is a folder; give a file name, e.g. --output "
                          f"{out / EXPORT_FILES['qdq']}")
    protected = {(run_dir / n).resolve() for n in [*files, MANIFEST]}
    if out.resolve() in protected:
        raise RecipeError(f"--output {out}: is a file of the run ({out.name}); exporting there would "
                          "overwrite it; choose another name (nothing was written)")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise RecipeError(f"--output {out}: {anc} is a file, so no file can be made under it")


def _read_report(report: Path) -> tuple[RunConfig, tuple[int, int, int], int | None]:
    """The configuration, input shape and class count (``None`` for image restoration) from a run's
    ``report.json``."""
    import json

    try:
        rep = json.loads(report.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"{report}: not valid JSON (truncated or damaged: {e})") from None
    data = rep.get("data") if isinstance(rep, dict) else None
    shape = data.get("input_shape") if isinstance(data, dict) else None
    classes = data.get("num_classes") if isinstance(data, dict) else None
    if not isinstance(rep, dict) or not isinstance(rep.get("config"), dict):
        raise RecipeError(f"{report}: no 'config' section; not the report of a `prunequant run`")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise RecipeError(f"{report}: data.input_shape must be 3 positive integers [C, H, W] (got {shape!r})")
    data_cfg = rep["config"].get("data")
    restoration = isinstance(data_cfg, dict) and data_cfg.get("name") in RESTORATION_DATA
    if not restoration and not (isinstance(classes, int) and classes > 0):
        raise RecipeError(f"{report}: data.num_classes must be a positive integer (got {classes!r})")
    cfg = RunConfig.from_dict(rep["config"], where=str(report))
    return cfg, (shape[0], shape[1], shape[2]), None if restoration else classes


def _check_analysis_out(out: Path) -> None:
    """``--out`` of ``analyze``: a folder that is or can be made, writable."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out}: is an existing file, not a folder (nothing was written)")
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise RecipeError(f"--out {out}: {anc} is a file, so no folder can be made under it (nothing was "
                          "written)")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise RecipeError(f"--out {out}: cannot write into {anc} (permission denied)")


def cmd_analyze(args: argparse.Namespace) -> int:
    """``prunequant analyze RUN_DIR`` / ``--config FILE``: how a layer's channel ranking depends on the
    sparsity of the layer before it (METHOD section 7). A run folder is held (``run.lock``) while it is
    read and written, so a run resuming into it meanwhile is kept out, and the other way round."""
    with contextlib.ExitStack() as held:
        return _analyze(args, held)


def _analyze(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    from .models import build_model
    from .train.analyze import check_measures, check_sparsities, run_analysis, write_analysis
    from .train.trainer import load_data, load_dense_checkpoint, load_dense_state
    from .utils import load_tensor_file, sha256_file

    # Every input is checked before anything is loaded or written.
    measures = check_measures(args.measures)
    sparsities = check_sparsities(args.sparsities)
    if args.calib < 1:
        raise RecipeError(f"--calib: must be a positive number of images (got {args.calib})")
    if (args.run_dir is None) == (args.config is None):
        raise RecipeError("analyze: give a run folder (prunequant analyze RUN_DIR) or a configuration "
                          "(prunequant analyze --config FILE.yaml --out DIR), not both or neither")
    run_dir: Path | None = None
    if args.run_dir is not None:
        from .runfolder import RunLock, verify_run

        if args.set:
            raise RecipeError("--set changes a --config configuration; a run folder is analysed with the "
                              "configuration it ran with")
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            what = "is a file, not a folder" if run_dir.exists() else "no such folder"
            raise RecipeError(f"{run_dir}: {what}; pass the --out folder of a finished `prunequant run`")
        if not (run_dir / "report.json").is_file():
            raise RecipeError(f"{run_dir}: no report.json here; pass the --out folder of a finished "
                              "`prunequant run`")
        lock = RunLock(run_dir, "analyze")
        lock.acquire(lambda m: print(m, file=sys.stderr))
        held.callback(lock.release)
        files = verify_run(run_dir, required=("report.json",))
        cfg, shape, num_classes = _read_report(run_dir / "report.json")
        rep_data = json.loads((run_dir / "report.json").read_text())["data"]
        if "dense.pt" in files:
            dense_path = run_dir / "dense.pt"
            state = load_tensor_file(dense_path, RecipeError, str(dense_path))
        elif cfg.train.dense_checkpoint:  # the run loaded its dense network from another run's dense.pt
            dense_path = Path(cfg.train.dense_checkpoint)
            state = load_dense_checkpoint(str(dense_path))
        else:
            raise RecipeError(f"{run_dir}: its manifest lists no dense.pt and the run did not load a "
                              "train.dense_checkpoint, so its dense network is not available")
        out = Path(args.out) if args.out else run_dir / "analysis"
        summary = run_dir / "summary.md"
    else:
        cfg = build_config(args.config, args.set or [])
        if not cfg.train.dense_checkpoint:
            raise RecipeError(f"--config {args.config}: train.dense_checkpoint is not set; analyze reads a "
                              "trained dense network (a run's dense.pt) and does not train one: set it "
                              "(--set train.dense_checkpoint=RUN/dense.pt) or analyze the run folder")
        if not args.out:
            raise RecipeError("analyze --config needs --out DIR (where ranking.json and the heatmap go)")
        dense_path = Path(cfg.train.dense_checkpoint)
        state = load_dense_checkpoint(str(dense_path))
        out = Path(args.out)
        summary = out / "summary.md"
        rep_data, shape, num_classes = None, None, None
    if cfg.data.name in RESTORATION_DATA:
        raise RecipeError(f"analyze: data.name={cfg.data.name} is image restoration; the ranking analysis "
                          "runs on classification runs only (nothing was written)")
    _check_analysis_out(out)
    if args.no_progress:
        cfg.train.progress = False
    data = load_data(cfg, log=lambda m: print(m, file=sys.stderr))
    if rep_data is not None and (data.name != rep_data.get("name")
                                 or [data.in_channels, data.image_size, data.image_size] != list(shape)
                                 or data.num_classes != num_classes):
        raise RecipeError(f"{run_dir}: the run trained on {rep_data.get('name')} {list(shape)} with "
                          f"{num_classes} classes, but its configuration loads {data.name} "
                          f"{[data.in_channels, data.image_size, data.image_size]} with {data.num_classes} "
                          "classes here (data.root or the installed dataset differ)")
    try:
        model = build_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                            image_size=data.image_size, width=cfg.model.width)
    except ValueError as e:
        raise RecipeError(f"model: {cfg.model.name} cannot be built for {data.name}: {e}") from None
    load_dense_state(model, state, cfg, data.name)
    print(f"prunequant {__version__}: ranking analysis of {cfg.model.name} ({dense_path}) on the first "
          f"{min(args.calib, len(data.train)):,} training images of {data.name} -> {out}", flush=True)
    source = {"run_dir": str(run_dir) if run_dir else None, "config": args.config,
              "dense": str(dense_path), "dense_sha256": sha256_file(dense_path)}
    analysis = run_analysis(cfg, model, data, calib=args.calib, measures=measures, sparsities=sparsities,
                            mode=args.mode, progress=cfg.train.progress, source=source)
    paths = write_analysis(analysis, out, summary, run_dir=run_dir)
    print(analysis["reading"])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="prunequant", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"prunequant {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train dense, prune layerwise, quantize, evaluate, report")
    r.add_argument("--config", help="YAML run configuration (default: the embedded default recipe)")
    r.add_argument("--out", default=None, help="output folder (default: runs/latest); it must be new, empty "
                   "or hold no run (see --resume, --overwrite)")
    r.add_argument("--resume", metavar="OUT", default=None,
                   help="continue the unfinished run in folder OUT from its last checkpoint, with the "
                        "configuration stored there (train.checkpoint_every / checkpoint_minutes)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run the --out folder holds (its files are removed first)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field, e.g. --set recipe.prune.sparsity=0.75 (repeatable)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)
    e = sub.add_parser("export", help="export a finished run's model (ONNX QDQ, QONNX or packed integers)")
    e.add_argument("run_dir", help="the --out folder of a finished `prunequant run`")
    e.add_argument("--format", choices=sorted(EXPORT_FILES), default="qdq")
    e.add_argument("--output", help="destination file (default: RUN_DIR/model.<format>...)")
    e.add_argument("--fold-bn", action="store_true",
                   help="fold each BatchNorm into the conv before it (packed: 2 numbers per channel instead "
                        "of 5; qdq: integer-kernel form); see docs/export.md")
    e.add_argument("--check", action="store_true",
                   help="qdq: run the file in ONNX Runtime (default settings) against PyTorch on the run's "
                        "test set; prints agreement, max abs diff, the CPU's features and a warning when "
                        "its 8-bit kernels saturate")
    e.set_defaults(func=cmd_export)
    a = sub.add_parser("analyze", help="how each layer's channel ranking changes with the preceding layer's "
                                       "sparsity (Kendall tau, edit distance, kept overlap)")
    a.add_argument("run_dir", nargs="?",
                   help="the --out folder of a finished `prunequant run` (its dense network is analysed)")
    a.add_argument("--config", help="instead of a run: a YAML run configuration whose "
                                    "train.dense_checkpoint names the dense network")
    a.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a --config field (repeatable)")
    a.add_argument("--calib", type=int, default=1024,
                   help="calibration images: the first N of the training split (default 1024)")
    a.add_argument("--sparsities", nargs="+", default=["0.25", "0.5", "0.75"], metavar="S",
                   help="preceding-layer sparsities in (0, 1) (default 0.25 0.5 0.75)")
    a.add_argument("--measures", nargs="+", default=["a_l1", "a_l0", "w_l1"], metavar="M",
                   help="importance measures: a_l1 (the paper's), a_l0, w_l1 (default: all three)")
    a.add_argument("--mode", choices=["train", "eval"], default="train",
                   help="BatchNorm while statistics gather: train (batch statistics, as the compressor "
                        "gathers them; default) or eval (running statistics)")
    a.add_argument("--out", help="output folder (default RUN_DIR/analysis; required with --config)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_analyze)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print a message (no traceback) and return 2."""
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrunequantError as e:  # recipe, dataset, graph, export, schedule errors: one message each
        # Several processes: a rank that stopped because another failed is quiet, and an error found by
        # every rank alike (the configuration) is printed by rank 0 alone.
        own = getattr(e, "rank_own", None)
        if not getattr(e, "quiet", False) and (_rank() == 0 or own is not None):
            print(f"error{f' (rank {own})' if own else ''}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
