"""What several commands share: their common options, and how a user's mistake is reported."""

from __future__ import annotations

import argparse
import json

from fimood.engine import METHODS
from fimood.models import MODELS


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit status 2, no traceback."""


def storage_options(text: str) -> dict:
    """--storage-options: a JSON object. The text itself is never echoed: it may hold secrets."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got a JSON {type(options).__name__}")
    return options


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        type=storage_options,
        default=None,
        metavar="JSON",
        help="JSON object passed to fsspec (credentials, endpoint); never logged",
    )


def add_model(parser: argparse.ArgumentParser) -> None:
    """--model, with the registered models as choices."""
    parser.add_argument("--model", default="glow", choices=sorted(MODELS), help="a registered model")


def add_preset(parser: argparse.ArgumentParser) -> None:
    """--preset, with every registered model's presets as choices (`check_preset` checks the pair)."""
    parser.add_argument(
        "--preset",
        default="small",
        choices=sorted({preset for cls in MODELS.values() for preset in cls.presets}),
        help="; ".join(f"{name}: {', '.join(cls.presets)}" for name, cls in sorted(MODELS.items())),
    )


def check_preset(model: str, preset: str) -> None:
    if preset not in MODELS[model].presets:
        raise UsageError(f"--preset {preset} is not a {model} preset; {model} has {', '.join(MODELS[model].presets)}")


def add_allow_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-import",
        nargs="+",
        default=[],
        metavar="PACKAGE",
        help="packages a checkpoint may name its model class from (your own model; docs/own-model.md)",
    )


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """How a Ray pass reads rows and runs its actor pool."""
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument(
        "--num-actors", type=int, default=1, help="model replicas in the actor pool (with --max-actors: the fewest)"
    )
    parser.add_argument(
        "--max-actors",
        type=int,
        default=None,
        help="let the pool grow to this many replicas while rows wait (an autoscaling cluster adds their nodes)",
    )
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs (and torch threads) per replica")
    parser.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per replica, a share of one (0.25: four per card) or whole ones; 0: CPUs only (default: 1 "
        "when the cluster has GPUs or its autoscaler can add GPU nodes, else 0)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="rows per gradient batch")
    parser.add_argument("--engine", default="auto", choices=METHODS, help="gradient engine")
    parser.add_argument(
        "--input-format",
        default="parquet",
        choices=["parquet", "images"],
        help="Parquet shards, or folders of PNG/JPEG files (id = path)",
    )
    parser.add_argument("--image-column", default="image", help="column of encoded images or uint8 arrays")
    parser.add_argument("--id-column", default="id", help="row id column; when absent, ids are `<file>#<row>`")
    parser.add_argument(
        "--max-error-fraction",
        type=float,
        default=0.5,
        help="fail instead of writing (or fitting on) rows of which more than this share could not be scored",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse, before any work, a model with a tensor no hooks-engine rule covers (no vmap fallback)",
    )
    add_allow_import(parser)


def pipeline_config(args: argparse.Namespace):
    """The PipelineConfig the pipeline options describe: one option per field (tests/test_cli.py checks the
    defaults agree)."""
    import dataclasses

    from fimood.passes import PipelineConfig

    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(PipelineConfig)
        if field.name != "allowed_imports"
    }
    return PipelineConfig(**given, allowed_imports=tuple(args.allow_import))


def named_url(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"expected NAME=URL, got {text!r}")
    return name, url
