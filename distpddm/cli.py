"""``distpddm`` command line: ``shards build``, ``shards verify``, ``train``, ``submit``, ``smoke``, ``eval``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .data.sources import KINDS, SourceError
from .redact import redact_handlers, redact_uncaught, redacted_output


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    t = text.strip().lower().rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _shards_build(args: argparse.Namespace) -> int:
    from .data.shards import BuildOptions, build, plan_summary
    from .data.sources import carve, listed_source, parse_holdout

    if args.kind != "fonts" and args.src is None:
        print("error: a source folder SRC is needed for --source " + args.kind, file=sys.stderr)
        return 2
    options = BuildOptions(
        shard_bytes=args.shard_size,
        max_side=args.max_side,
        jpeg_quality=args.quality,
        chunk_size=args.chunk_size,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
        skip_bad=args.skip_bad,
        max_bad=args.max_bad,
    )
    holdout = parse_holdout(args.holdout_classes)
    if args.kind == "wds-index":  # published shards indexed in place: the plan is the index (no listing kept)
        from .data.wdsbuild import read_wds_index

        if args.src is None:
            print("error: --source wds-index needs the folder `distpddm shards index` wrote", file=sys.stderr)
            return 2
        listed = read_wds_index(args.src, args.in_flight)
    else:
        listed = listed_source(
            args.kind,
            args.src,
            args.out,
            synsets=args.synsets,
            fonts=args.fonts,
            font_size=args.font_size,
            seed=args.seed,
            rescan=args.rescan,
            progress=not args.quiet,
        )
    plan = carve(listed, args.val_per_class, holdout, seed=args.seed)
    if args.dry_run:
        kept = "" if args.kind == "wds-index" else "; the listing is kept in OUT/plan.npz for the build"
        for split, planned in plan_summary(plan, options).items():
            print(
                f"{split}: {planned['images']} images, {planned['classes']} classes -> {planned['shards']} shards, "
                f"about {planned['estimated_bytes'] / 2**30:.2f} GiB (dry run: no shard written{kept})"
            )
        return 0
    indexes = build(plan, args.out, options)
    for split, index in indexes.items():
        total = sum(s["bytes"] for s in index["shards"])
        print(
            f"{split}: {index['samples']} images, {len(index['classes'])} classes, {len(index['shards'])} shards, "
            f"{total / 2**20:.1f} MiB -> {Path(args.out) / split}"
        )
        bad = index["bad_files"]
        if bad:
            print(f"  {len(bad)} source file(s) left out (unreadable; listed in index.json 'bad_files'):")
            for b in bad[:10]:
                print(f"    {b['source']}: {b['error']}")
            if len(bad) > 10:
                print(f"    ... and {len(bad) - 10} more")
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    from .data.shards import verify

    reports = verify(args.out, sample=args.sample, progress=not args.quiet)
    bad = 0
    for r in reports:
        status = "OK" if r.ok else f"{len(r.problems)} PROBLEM(S)"
        print(f"{r.split_dir}: {r.shards} shards, {r.samples} samples, {r.decoded} decoded: {status}")
        for p in r.problems[:50]:
            print(f"  - {p}")
        if len(r.problems) > 50:
            print(f"  ... and {len(r.problems) - 50} more")
        bad += not r.ok
    return 1 if bad else 0


def _shards_index(args: argparse.Namespace) -> int:
    from .data.sources import parse_holdout
    from .data.wdsindex import IndexOptions, TooManyBadError, index_shards

    options = IndexOptions(
        split=args.split,
        class_names=args.class_names,
        classes=args.classes,
        min_per_class=args.min_per_class,
        val_per_class=args.val_per_class,
        holdout=parse_holdout(args.holdout_classes),
        seed=args.seed,
        workers=args.workers,
        window=args.window,
        max_bad=args.max_bad,
        max_bad_shards=args.max_bad_shards,
        progress=not args.quiet,
    )
    try:
        summary = index_shards(args.src, args.out, options)
    except TooManyBadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    read = f"{summary.bytes_read / 2**20:.1f} MiB read of {summary.shard_bytes / 2**20:.1f} MiB of shards"
    print(
        f"{summary.shards} shards: {summary.indexed} indexed ({read}), {summary.skipped} already indexed, "
        f"{len(summary.bad_shards)} skipped as damaged or unreadable; {summary.samples} samples, "
        f"{len(summary.bad_samples)} bad samples left out"
    )
    for b in summary.bad_shards[:10]:
        print(f"  shard {b['url']}: {b['error']}")
    for b in summary.bad_samples[:10]:
        print(f"  sample {b['url']}:{b['key']}: {b['error']}")
    for split, index in summary.splits.items():
        print(
            f"{split}: {index['samples']} images, {len(index['classes'])} classes, {len(index['shards'])} shards "
            f"-> {Path(args.out) / split}"
        )
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import stop

    stop.install()  # first: SIGUSR1 / SIGTERM from now on stop the run with a checkpoint (exit 3), never kill it
    try:
        return _run_training(args)
    finally:
        stop.ignore_late()  # and a late one must not kill the exit either


def _run_training(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .errors import DeterministicError, StorageUnavailable
    from .ray_cluster import TrainingFailed
    from .train.checkpoint import CheckpointUnreadable
    from .train.stop import EXIT_PREEMPTED, Preempted

    if args.fresh and args.force:
        print("error: --fresh starts a new run, --force resumes this one: give one of them", file=sys.stderr)
        return 2
    if args.fresh:
        import dataclasses

        from .train.runfolder import fresh_name

        cfg = dataclasses.replace(cfg, name=fresh_name(cfg))
        print(f"a new run: name={cfg.name}, in {cfg.output_location()}")
    try:
        if args.local:
            from .train.launch import train_local

            metrics = train_local(cfg, force=args.force)
        else:
            from .train.launch import train_ray

            metrics = train_ray(cfg, args.address, force=args.force).metrics or {}
    except ConfigError as e:  # the run folder's checkpoints are another run's
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DeterministicError as e:  # retrying cannot fix it: the message says what to change
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingFailed as e:  # Ray gave up on the workers (ray.max_failures spent)
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1
    except (CheckpointUnreadable, StorageUnavailable) as e:  # storage that would not answer: rerun later
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as p:
        print(f"preempted: checkpoint at step {p.step} in {p.location}; the same command resumes from it")
        return EXIT_PREEMPTED
    print(
        f"done: step {int(metrics.get('step', 0))}, loss {metrics.get('loss', float('nan')):.3f}, "
        f"embedding spread {metrics.get('spread', float('nan')):.3f}; output in {cfg.output_location()}"
    )
    ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("val_recall@"))
    if ks:
        before = "  ".join(f"R@{k} {metrics.get(f'val0_recall@{k}', float('nan')):.3f}" for k in ks)
        after = "  ".join(f"R@{k} {metrics[f'val_recall@{k}']:.3f}" for k in ks)
        print(f"held-out Recall@K, untrained network: {before}")
        print(f"held-out Recall@K, after training:    {after}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from .submit import submit

    return submit(args.config, args.overrides, args.address, wait=not args.no_wait)


def _smoke(args: argparse.Namespace) -> int:
    from .smoke import smoke

    config, overrides = args.config, args.overrides
    if config is not None and "=" in str(config) and not config.exists():  # no CONFIG, overrides only
        config, overrides = None, [str(config), *overrides]
    return smoke(config, overrides, steps=args.steps, out=args.out, device=args.device)


def _eval(args: argparse.Namespace) -> int:
    from .errors import DeterministicError
    from .evaluate import RECALL_KS, default_out, evaluate_folder, extract, resolve_model
    from .ray_cluster import TrainingFailed

    try:
        if args.embeddings is not None:
            if args.run is not None or args.shards is not None:
                print("error: give either --embeddings DIR or RUN_OR_MODEL --shards SPLIT", file=sys.stderr)
                return 2
            folder = Path(args.embeddings)
            out = Path(args.out) if args.out else folder
        else:
            if args.run is None or args.shards is None:
                print("error: RUN_OR_MODEL and --shards SPLIT are needed (or --embeddings DIR)", file=sys.stderr)
                return 2
            model, run = resolve_model(args.run)
            out = Path(args.out) if args.out else default_out(model, run, args.shards)
            folder = out
            n = extract(
                model,
                args.shards,
                out,
                local=args.local,
                workers=args.workers,
                gpu=args.gpu,
                address=args.address,
                image_size=args.image_size,
                batch_size=args.batch_size,
                loader_workers=args.loader_workers,
                limit=args.max_images,
                progress=not args.quiet,
            )
            print(f"embedded {n} images of {args.shards} -> {out}/embeddings.npy")
        metrics = evaluate_folder(
            folder,
            out,
            r_cap=args.r_cap,
            support=args.support,
            rerank_n=args.rerank,
            nmi=not args.no_nmi,
            report=not args.no_report,
            progress=not args.quiet,
        )
    except (DeterministicError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"error: extraction failed: {e}", file=sys.stderr)
        return 1
    print(format_metrics(metrics, RECALL_KS))
    if not args.no_report:
        print(f"report: {out / 'report.html'}")
    print(f"metrics: {out / 'metrics.json'}")
    return 0


def format_metrics(metrics: dict, ks) -> str:
    """The Recall@K table (Euclidean, and re-ranked when present) and the other figures, as text."""
    shown = [k for k in ks if f"recall@{k}" in metrics]
    lines = ["           " + "".join(f"  R@{k:<4}" for k in shown)]
    lines.append("euclidean  " + "".join(f"  {metrics[f'recall@{k}']:.3f} " for k in shown))
    for name in sorted({k.split("/")[0] for k in metrics if k.startswith("rerank@")}):
        row = [
            f"  {metrics[f'{name}/recall@{k}']:.3f} " if f"{name}/recall@{k}" in metrics else "    -   " for k in shown
        ]
        lines.append(f"{name:<11}" + "".join(row))
    others = [
        k for k in ("r_precision", "map@r", "nmi", "ncm_top1", "ncm_top5", "knn_top1", "knn_top5") if k in metrics
    ]
    if others:
        lines.append("  ".join(f"{k} {metrics[k]:.3f}" for k in others))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distpddm", description="Distributed PDDM metric learning")
    sub = p.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="build and verify WebDataset shards").add_subparsers(
        dest="shards_command", required=True
    )
    b = shards.add_parser("build", help="build shards from a dataset folder")
    b.add_argument("--source", dest="kind", choices=(*KINDS, "wds-index"), required=True, help="source layout")
    b.add_argument(
        "src",
        type=Path,
        nargs="?",
        help="source folder (fonts: optional extra font folder; wds-index: the OUT of `shards index`, or one split)",
    )
    b.add_argument("out", type=Path, help="output folder: OUT/<split>/*.tar + index.json")
    b.add_argument("--shard-size", type=_size, default="512M", help="target shard size (default 512M)")
    b.add_argument("--max-side", type=int, help="re-encode as JPEG with the longer side at most N pixels")
    b.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    b.add_argument(
        "--chunk-size", type=int, default=8, help="images of one class stored together: 2 x the K you train with"
    )
    b.add_argument("--synsets", type=Path, help="imagenet: file fixing the class order (one wnid per line)")
    b.add_argument("--fonts", type=Path, nargs="*", help="fonts: more font folders")
    b.add_argument("--font-size", type=int, default=64, help="fonts: glyph image size")
    b.add_argument("--val-per-class", type=int, help="carve a val split: N images of each train class (seeded)")
    b.add_argument(
        "--holdout-classes",
        metavar="FRACTION|LIST",
        help="carve a 'holdout' split of whole classes never trained on: a fraction of the classes (seeded), "
        "a file with one class name per line, or comma-separated names",
    )
    b.add_argument("--skip-bad", action="store_true", help="leave out source images that do not decode (listed)")
    b.add_argument(
        "--max-bad", type=float, default=0.001, help="with --skip-bad: most bad files (a count, or a fraction < 1)"
    )
    b.add_argument("--rescan", action="store_true", help="list the source again instead of reusing OUT/plan.npz")
    b.add_argument("--dry-run", action="store_true", help="list, carve and plan; print the shards it would write")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, help="parallel processes (default: all cores)")
    b.add_argument(
        "--in-flight", type=int, default=8, help="wds-index: image range reads in flight per worker process (default 8)"
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_shards_build)

    v = shards.add_parser("verify", help="check counts, hashes, labels and that images decode")
    v.add_argument("out", type=Path, help="a build output folder, or one split folder")
    v.add_argument("--sample", type=float, default=1.0, help="fraction of images to decode (default all)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_shards_verify)

    x = shards.add_parser("index", help="index published WebDataset shards in place (no image is copied)")
    x.add_argument("src", help="shard pattern, local or URL ('DIR/imagenet12k-train-{0000..1023}.tar'), or a folder")
    x.add_argument("out", type=Path, help="output folder: OUT/shard-index/*.idx.npz + OUT/<split>/index.json")
    x.add_argument("--split", default="train", help="the split the shards form (default train)")
    x.add_argument("--class-names", type=Path, help="class names, line n naming label n (default: the json members)")
    x.add_argument("--classes", type=Path, help="index only these classes: a file with one class name per line")
    x.add_argument("--min-per-class", type=int, default=1, help="leave out classes with fewer images")
    x.add_argument("--val-per-class", type=int, help="carve a val split: N images of each class (seeded)")
    x.add_argument("--holdout-classes", metavar="FRACTION|LIST", help="carve a 'holdout' split of whole classes")
    x.add_argument("--max-bad", type=float, default=0.001, help="most bad samples (a count, or a fraction < 1)")
    x.add_argument("--max-bad-shards", type=int, default=0, help="most damaged or unreadable shards to skip")
    x.add_argument("--window", type=_size, default="4k", help="bytes fetched with each tar header (default 4k)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--workers", type=int, default=16, help="shards read at once (threads, default 16)")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.set_defaults(func=_shards_index)

    t = sub.add_parser("train", help="train PDDM embeddings (Ray Train + DeepSpeed, or --local)")
    t.add_argument("config", type=Path, help="a YAML run config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 data.images_per_class=4")
    t.add_argument("--local", action="store_true", help="run in this process (or under torchrun), without Ray")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    t.add_argument("--fresh", action="store_true", help="a new run in a new folder (name-2, name-3...)")
    t.add_argument(
        "--force", action="store_true", help="resume the run folder's checkpoints even if another config made them"
    )
    t.set_defaults(func=_train)

    j = sub.add_parser("submit", help="submit a training run to a running Ray cluster as a Ray Job")
    j.add_argument("config", type=Path, help="a YAML run config; its paths are resolved here and sent absolute")
    j.add_argument("overrides", nargs="*", help="section.key=value (relative paths: from the current folder)")
    j.add_argument("--address", help="the job server, http://HEAD:8265 (default: RAY_ADDRESS)")
    j.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following it")
    j.set_defaults(func=_submit)

    m = sub.add_parser("smoke", help="one device, a few hundred steps: images/s, held-out R@1 rises, the export loads")
    m.add_argument("config", type=Path, nargs="?", default=None, help="default: configs/smoke.yaml of the checkout")
    m.add_argument("overrides", nargs="*", help="section.key=value")
    m.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    m.add_argument(
        "--out", type=Path, help="storage folder, kept (default: a temporary one, removed); its smoke run is replaced"
    )
    m.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="gpu: bf16; cpu: fp32")
    m.set_defaults(func=_smoke)

    e = sub.add_parser("eval", help="embed a split and measure retrieval, clustering, transfer; write a report")
    e.add_argument("run", nargs="?", metavar="RUN_OR_MODEL", help="a run folder (with model.pt) or a model.pt")
    e.add_argument("--shards", help="the split to evaluate (a folder with index.json), class-disjoint from training")
    e.add_argument("--embeddings", metavar="DIR", help="recompute metrics from an earlier extraction folder")
    e.add_argument("--out", help="output folder (default: RUN/eval-<split>; a checkpoint's: RUN/eval-<split>-<step>)")
    e.add_argument("--local", action="store_true", help="embed in this process instead of on Ray workers")
    e.add_argument("--workers", type=int, default=2, help="Ray workers for the extraction (default 2)")
    e.add_argument("--gpu", action="store_true", help="one GPU per worker (bf16 backbone)")
    e.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    e.add_argument("--image-size", type=int, help="evaluation crop (default: the one the model was trained for)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers per rank")
    e.add_argument("--max-images", type=int, help="only the split's first N images")
    e.add_argument("--support", type=int, help="transfer: N labelled images per class, the rest are queries")
    e.add_argument("--rerank", type=int, default=8, help="re-rank each query's top N with the learned metric (0: off)")
    e.add_argument("--r-cap", type=int, help="cap on R for R-Precision and MAP@R (giant classes)")
    e.add_argument("--no-nmi", action="store_true", help="skip the k-means clustering (NMI)")
    e.add_argument("--no-report", action="store_true", help="metrics.json only")
    e.add_argument("--quiet", action="store_true", help="no progress output")
    e.set_defaults(func=_eval)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``train``'s ``key=value`` overrides may also follow its options
    (``train CONFIG --address A ray.num_workers=4``), in the order given. (``parse_intermixed_args`` refuses
    parsers with sub-commands.)"""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    redact_handlers(logging.getLogger())
    redact_uncaught()  # an error no command catches: its traceback, redacted
    args = parse_args(build_parser(), argv)
    with redacted_output():  # no URL's password or query values in what a command prints
        try:
            return args.func(args)
        except (SourceError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    raise SystemExit(main())
