"""`hooked-vlm` command line: demo (the main job), train-organism, bench-circuits, bench-effects."""
from __future__ import annotations

import argparse
import sys


def int_at_least(low: int):
    """An argparse `type`: an integer >= `low`; anything else is an error naming the bound and the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hooked-vlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the papers' analyses on a model and write report/index.html + summary.json")
    demo.add_argument("--model", default=None,
                      help="checkpoint directory, shipped organism name (e.g. shapes_qwen2_vl) or hub name "
                           "(default: the shipped LLaVA Shapes organism)")
    demo.add_argument("--out", default="report", help="output directory (default: report/)")
    demo.add_argument("--n", type=int_at_least(1), default=256, help="samples per measurement (default 256)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="overwrite the output directory if it holds files")
    sub.add_parser("train-organism", help="train the Shapes organism (see --help of the subcommand)", add_help=False)
    bench = sub.add_parser("bench-circuits", help="how well each analysis recovers the organism's planted heads")
    bench.add_argument("--model", default=None, nargs="*",
                       help="organism directories or shipped names, e.g. shapes_llava shapes_qwen2_vl (default: every "
                            "shipped circuit organism, not the effect organisms)")
    bench.add_argument("--out", default="report", help="writes circuits.md and circuits.json here")
    bench.add_argument("--n", type=int_at_least(1), default=64)
    bench.add_argument("--seed", type=int, default=0)
    effects = sub.add_parser("bench-effects", help="each paper's effect detector on the organisms whose organism.json "
                             "has a ground_truth: does it say yes where the effect was planted and no where it is absent?")
    effects.add_argument("--model", default=None, nargs="*",
                         help="organism directories or shipped names (default: every shipped organism whose "
                              "organism.json has a ground_truth)")
    effects.add_argument("--json", default=None, metavar="FILE",
                         help="write the JSON list of rows here (default: print it)")
    effects.add_argument("--n", type=int_at_least(1), default=64, help="prompts per measurement (default 64)")
    effects.add_argument("--seed", type=int, default=0)
    effects.add_argument("--write-record", action="store_true",
                         help="also store each organism's rows (and the detector's full measurement) in its "
                              "organism.json under effect_detectors")
    if argv[:1] == ["train-organism"]:
        from .organism.train import main as train_main

        return train_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from hooked_vlm.analyses.demo import check_out_dir, run_demo

        try:
            check_out_dir(args.out, args.force)  # before minutes of work, not after
        except (FileExistsError, NotADirectoryError) as err:
            demo.error(str(err))
        run_demo(model_path=args.model, out_dir=args.out, n=args.n, seed=args.seed, force=args.force)
    elif args.command == "bench-circuits":
        _bench_circuits(args)
    elif args.command == "bench-effects":
        from hooked_vlm.analyses.effects.runner import main_cli, resolve_models

        try:
            resolve_models(args.model)  # an unknown name or a model without ground_truth fails here, not minutes in
        except (FileNotFoundError, ValueError) as err:
            effects.error(str(err))
        return main_cli(args.model, args.json, args.n, args.seed, args.write_record)
    return 0


def _bench_circuits(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from hooked_vlm.analyses.ground_truth import bench_circuits, rows_to_markdown

    from .organism import load_organism, organism_dir, organism_record, shipped_organisms

    names = args.model or shipped_organisms("circuit")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows, parts = [], []
    for name in names:
        path = organism_dir(name)
        if not (path / "organism.json").exists():
            raise SystemExit(f"{path} has no organism.json: bench-circuits needs a model with a recorded planted circuit")
        record = organism_record(path)
        rows = bench_circuits(load_organism(path), record, n=args.n, seed=args.seed)
        for row in rows:
            row["organism"] = record.get("name", path.name)
        all_rows += rows
        parts.append(f"## {record.get('name', path.name)}\n\n{rows_to_markdown(rows)}")
    (out / "circuits.md").write_text("\n\n".join(parts))
    (out / "circuits.json").write_text(json.dumps(all_rows, indent=2))
    print("\n\n".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
