"""Ray at run time: connecting (or starting a local Ray), keeping its notices quiet, and the errors raised
inside Ray tasks that are one line for the user (storage unavailable, a GPU torch cannot use) reported so."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.data import DataContext

from fimood.models.base import GpuUnusable
from fimood.storage import StorageUnavailable


def quiet_ray() -> None:
    """Keep Ray's start-up notices out of a user's output: its Python logs only from ERROR, its C++
    core's only when fatal (for a Ray started afterwards). Without it a local run shows a warning that
    token authentication is on, and an error-level line for every actor pool ("constructor arguments
    in the object store": a known Ray issue, ray-project/ray#57733) that reads like a failure and is not.
    Ray Data's own logger only from CRITICAL: it logs a failed task's trace at ERROR, and the error
    itself still reaches the caller, who reports it (in one line, when it is one of ONE_LINE_ERRORS).
    """
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # Ray Data's logger has a level of its own


ONE_LINE_ERRORS = (StorageUnavailable, GpuUnusable)  # raised in Ray tasks, reported as the one line they are

# Ray Data's own file reads (the monitor's summaries of the score table) retry errors whose message holds
# one of these, beside Ray's defaults: what s3fs, botocore and aiohttp say for the errors that
# `fimood.storage.transient` retries (throttling, a store that does not answer, a stream cut short).
RETRIED_IO_ERRORS = (
    "reduce your request rate",
    "SlowDown",
    "Service Unavailable",
    "Could not connect to the endpoint URL",
    "Connection was closed",
    "Connect timeout",
    "Read timeout",
    "IncompleteRead",
    "Response payload is not completed",
    "reading from response stream",
    "Server disconnected",
)  # plain text, so a valid regex as well: Ray's warning about substring matching does not apply to them


@contextmanager
def errors_in_one_line() -> Iterator[None]:
    """A `StorageUnavailable` or `GpuUnusable` raised in a Ray task or actor reaches the caller as itself,
    its one line, not inside Ray's trace."""
    try:
        yield
    except ONE_LINE_ERRORS:
        raise
    except Exception as error:
        found = one_line_cause(error)
        if found is None:
            raise
        kind, message = found
        raise kind(message) from None


def one_line_cause(error: BaseException) -> tuple[type[Exception], str] | None:
    """The type and message of the one-line error behind an error. Ray keeps a task's error as `cause`, but
    Ray Data's map errors keep only its text, so the message is taken from there when no object is left."""
    text = str(error)
    for _ in range(20):  # causes chain shallowly; the bound only guards against cycles
        inner = getattr(error, "cause", None)
        if isinstance(inner, BaseException):
            error = inner
        elif isinstance(error, ONE_LINE_ERRORS):
            return type(error), str(error)
        elif (error := error.__cause__ or error.__context__) is None:
            break
    for kind in ONE_LINE_ERRORS:
        found = re.search(rf"{kind.__module__}\.{kind.__name__}: (.+)", text)
        if found:
            return kind, found.group(1)
    return None


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
    context = DataContext.get_current()
    with warnings.catch_warnings():  # Ray warns of any value but its default; these patterns are valid regexes
        warnings.simplefilter("ignore", DeprecationWarning)
        context.retried_io_errors = list(dict.fromkeys([*context.retried_io_errors, *RETRIED_IO_ERRORS]))
