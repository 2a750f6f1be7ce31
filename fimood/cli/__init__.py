"""The `fimood` command: one small module per subcommand (its arguments and its run side by side).

A mistake in the command line or its inputs (a missing path, a bad flag or setting) is reported as one
line with exit status 2, storage that stays unreachable as one line with exit status 1; `-v` shows
the traceback. Logs are quiet by default: fimood's own progress, and
from Ray only what is a real problem.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from fimood.cli import (
    benchmark,
    benchmark_pipeline,
    benchmark_reduce,
    benchmark_scale,
    data,
    demo,
    evaluate,
    fit,
    monitor,
    monitor_study,
    score,
    study,
    train,
)
from fimood.cli.options import UsageError, add_storage_options
from fimood.lake.delta import ConcurrentWriters
from fimood.models.base import GpuUnusable
from fimood.storage import StorageUnavailable

COMMANDS: dict[str, ModuleType] = {
    "data": data,
    "train": train,
    "fit": fit,
    "score": score,
    "monitor": monitor,
    "evaluate": evaluate,
    "study": study,
    "monitor-study": monitor_study,
    "demo": demo,
    "benchmark": benchmark,
    "benchmark-pipeline": benchmark_pipeline,
    "benchmark-reduce": benchmark_reduce,
    "benchmark-scale": benchmark_scale,
}
# What a user's input can be wrong in: reported as one line, never as a traceback of our code.
USER_ERRORS = (UsageError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fimood",
        description=(
            "Out-of-distribution scoring with layer-wise gradient norms of deep generative models. "
            "URLs may be local paths or any fsspec URL (s3://, gs://, memory://, ...)."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, and a traceback with any error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        add_storage_options(sub)
        sub.set_defaults(run=module.run)
    return parser


def configure_logging(verbose: bool) -> None:
    """fimood's progress at INFO (DEBUG with -v), other libraries' logs from WARNING, and unless -v,
    Ray quiet (`passes.quiet_ray`); Ray Data's progress is still shown."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("fimood").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        from fimood.passes import quiet_ray

        quiet_ray()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if args.verbose:
            raise
        print(f"fimood {args.command}: error: {error}", file=sys.stderr)
        return 2
    except StorageUnavailable as error:
        if args.verbose:
            raise
        print(f"fimood {args.command}: storage unavailable: {error}", file=sys.stderr)
        return 1
    except ConcurrentWriters as error:
        if args.verbose:
            raise
        print(f"fimood {args.command}: another run at once: {error}", file=sys.stderr)
        return 1
    except GpuUnusable as error:
        if args.verbose:
            raise
        print(f"fimood {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
