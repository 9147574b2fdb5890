"""`hooked-vlm` command line: demo (the main job), train-organism."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hooked-vlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the papers' analyses on a model and write report/index.html + summary.json")
    demo.add_argument("--model", default=None, help="checkpoint directory or hub name (default: the shipped Shapes organism)")
    demo.add_argument("--out", default="report", help="output directory (default: report/)")
    demo.add_argument("--n", type=int, default=256, help="samples per measurement (default 256)")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("train-organism", help="train the Shapes organism (see --help of the subcommand)", add_help=False)
    if argv[:1] == ["train-organism"]:
        from .organism.train import main as train_main

        return train_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from analyses.demo import run_demo

        run_demo(model_path=args.model, out_dir=args.out, n=args.n, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
