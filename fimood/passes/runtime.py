"""Ray at run time: connecting (or starting a local Ray), keeping its notices quiet, and storage errors
raised inside Ray tasks reported as the one line they are."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from fimood.storage import StorageUnavailable


def quiet_ray() -> None:
    """Keep Ray's start-up notices out of a user's output: its Python logs only from ERROR, its C++
    core's only when fatal (for a Ray started afterwards). Without it a local run shows a warning that
    token authentication is on, and an error-level line for every actor pool ("constructor arguments
    in the object store": a known Ray issue, ray-project/ray#57733) that reads like a failure and is not.
    """
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in ("ray", "ray.data"):  # Ray Data's logger has a level of its own
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def storage_errors_in_one_line() -> Iterator[None]:
    """A `StorageUnavailable` raised in a Ray task reaches the caller as its one line, not inside Ray's trace."""
    try:
        yield
    except Exception as error:
        cause = storage_cause(error)
        if cause is None:
            raise
        raise StorageUnavailable(cause) from None


def storage_cause(error: BaseException) -> str | None:
    """The message of the `StorageUnavailable` behind an error. Ray keeps a task's error as `cause`, but
    Ray Data's map errors keep only its text, so the message is taken from there when no object is left."""
    text = str(error)
    for _ in range(20):  # causes chain shallowly; the bound only guards against cycles
        inner = getattr(error, "cause", None)
        if isinstance(inner, BaseException):
            error = inner
        elif isinstance(error, StorageUnavailable):
            return str(error)
        elif (error := error.__cause__ or error.__context__) is None:
            break
    found = re.search(rf"{StorageUnavailable.__module__}\.{StorageUnavailable.__name__}: (.+)", text)
    return found.group(1) if found else None


def start_ray(address: str | None = None) -> None:
    """Connect to `address` or RAY_ADDRESS; with neither, start a local Ray.

    Ray logs at the level its logger is set to (the CLI sets ERROR unless -v), not lower; when that is
    ERROR (`quiet_ray`), the workers' own log lines stay in Ray's log files instead of the user's terminal.
    """
    if not ray.is_initialized():
        level = max(logging.WARNING, logging.getLogger("ray").getEffectiveLevel())
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            logging_level=level,
            log_to_driver=level < logging.ERROR,
        )
