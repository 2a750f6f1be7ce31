"""fimood demo: the whole method end to end on the bundled data, under one folder."""

from __future__ import annotations

import argparse

from fimood.engine import METHODS

HELP = "build demo data, train Glow on FashionMNIST, fit, evaluate vs MNIST and digits, score MNIST"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--engine", default="auto", choices=METHODS, help="gradient engine")


def run(args: argparse.Namespace) -> int:
    from fimood.onboarding.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(out=args.out, preset=args.preset, train_steps=args.train_steps, engine=args.engine))
    print(result.report())
    print(f"\nscored MNIST through the pipeline: {result.score}; score table under {args.out}/scores/mnist")
    print(result.read_back_line())
    print(f"\n{result.monitor}\nreport: {args.out}/monitor/report/index.html")
    return 0
