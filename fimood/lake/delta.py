"""Delta Lake tables on any URL the project takes: where they live, how to reach them, how to replace rows.

The score table and the monitor's history are Delta tables (`deltalake`, delta-rs: no JVM, no
catalog), so DuckDB, Polars, pyarrow, Ray Data and Spark read them with their own Delta reader and
get one committed version, whole. A replace is one commit: the rows a predicate selects are removed
and the new rows added together, or not at all. Two writers race on the commit's log entry, which
is created only if absent (a rename that refuses to overwrite on local disk, a conditional PUT on
S3); the loser finds the table changed, and `replace_rows` tries again on the new version.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from fimood.storage import RETRY_SECONDS_ENV, StorageOptions, StorageUnavailable, retry_seconds

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 5  # a replace that keeps losing the race to other writers stops after this many tries
LOG = "_delta_log"

# Where delta-rs and fsspec mean the same store by the same URL (not memory://: one store per process each).
DELTA_SCHEMES = frozenset({"file", "s3", "s3a", "gs", "az", "abfs", "abfss"})
# fsspec's s3fs options and the Delta (object_store) option each one becomes.
_S3_OPTIONS = {
    "key": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
    "endpoint_url": "AWS_ENDPOINT_URL",
    "region_name": "AWS_REGION",
    "profile": "AWS_PROFILE",
}


_UNREACHABLE = ("error sending request", "connection refused", "timed out", "connect error", "dns error")


@contextmanager
def unavailable_in_one_line(what: str) -> Iterator[None]:
    """delta-rs retries an unreachable store for `retry_timeout` (set from FIMOOD_STORAGE_RETRY_SECONDS);
    when it gives up, the error is fimood's `StorageUnavailable`, in one line, as for every other call."""
    try:
        yield
    except OSError as error:
        message = str(error).lower()
        if not any(sign in message for sign in _UNREACHABLE):
            raise
        raise StorageUnavailable(
            f"{what}: the storage did not answer for {retry_seconds():g} s; what was committed before is kept: "
            f"run again when it is back (set {RETRY_SECONDS_ENV} to wait longer)"
        ) from None


class ConcurrentWriters(RuntimeError):
    """Other writers committed to the table every time this one tried; what they committed stands."""


def delta_location(url: str, storage_options: StorageOptions = None) -> tuple[str, dict[str, str]]:
    """The table URI and storage options delta-rs takes for an fsspec URL and its storage options.

    For s3:// URLs, s3fs options (`key`, `secret`, `token`, `client_kwargs.endpoint_url`,
    `client_kwargs.region_name`, `anon`) are translated. Options already in delta-rs's own form (upper
    case, or starting `aws_`, `google_` or `azure_`: `AWS_PROFILE`, `GOOGLE_SERVICE_ACCOUNT`, ...) pass
    as they are; s3fs's client tuning (`config_kwargs`, caches) stays with fsspec; any other option is
    refused, never dropped. What it returns is what any delta-rs reader (Polars, Ray, deltalake) takes.
    """
    local = "://" not in url or url.startswith("file://")
    scheme = "file" if local else url.split("://", 1)[0]
    if scheme not in DELTA_SCHEMES:
        raise ValueError(
            f"{url}: a table can live on local disk or {', '.join(sorted(DELTA_SCHEMES - {'file'}))}, not {scheme}://"
        )
    uri = os.path.abspath(url.removeprefix("file://")) if local else url.rstrip("/")
    options: dict[str, str] = {}
    unknown = []
    given = dict(storage_options or {})
    client = dict(given.pop("client_kwargs", None) or {})
    for key, value in {**given, **client}.items():
        if key in _S3_OPTIONS and scheme in ("s3", "s3a"):
            options[_S3_OPTIONS[key]] = str(value)
        elif key == "anon" and scheme in ("s3", "s3a"):
            options["AWS_SKIP_SIGNATURE"] = str(bool(value)).lower()
        elif key.isupper() or key.startswith(("aws_", "google_", "azure_")):
            options[key] = str(value)
        elif key not in ("skip_instance_cache", "config_kwargs", "use_listings_cache"):  # fsspec-side only
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"storage options {sorted(unknown)} have no Delta Lake equivalent; give them in delta-rs's own form "
            "(upper case, e.g. AWS_ACCESS_KEY_ID) instead"
        )
    if options.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        options.setdefault("AWS_ALLOW_HTTP", "true")
    return uri, options


def tuned(uri: str, options: dict[str, str]) -> dict[str, str]:
    """The options fimood's own delta-rs calls use: a remote store is retried while it does not answer for
    as long as fimood's other calls are (`FIMOOD_STORAGE_RETRY_SECONDS`), not 10 tries."""
    if "://" not in uri:
        return options
    retries = {"connect_timeout": "10s", "retry_timeout": f"{max(retry_seconds(), 1.0):g}s", "max_retries": "1000"}
    return {**retries, **options}


def open_table(uri: str, options: dict[str, str]) -> DeltaTable | None:
    """The table's current version, or None where there is no table yet."""
    try:
        with unavailable_in_one_line(f"open {uri}"):
            return DeltaTable(uri, storage_options=tuned(uri, options))
    except TableNotFoundError:
        return None


def replace_rows(
    uri: str,
    options: dict[str, str],
    rows_for: Callable[[DeltaTable | None], pa.Table | pa.RecordBatchReader | None],
    *,
    predicate: str,
    partition_by: list[str],
    metadata: dict[str, str],
    name: str,
    description: str,
) -> bool:
    """Replace the rows that `predicate` selects, in one commit on the version `rows_for` saw.

    `rows_for(table)` gets the table's current version (None before the first commit) and returns
    the new rows (every one of which `predicate` must select), or None when there is nothing to do;
    it raises to stop. The write is pinned to that version: a commit that lands meanwhile on other
    rows is no conflict (delta-rs commits on top of it), one on the same rows is, and then `rows_for`
    is asked again on the new version, up to COMMIT_ATTEMPTS times. The first commit, which creates
    the table, is never retried by delta-rs on top of a racing creator (it would keep both writers'
    rows): it loses and is asked again. Returns whether it committed.
    """
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        table = open_table(uri, options)
        rows = rows_for(table)
        if rows is None:
            return False
        # The first commit creates the table, or fails: were it retried by delta-rs, or written over a
        # table a racing creator made meanwhile, it would keep or replace rows `rows_for` never saw.
        creating = table is None
        try:
            with unavailable_in_one_line(f"commit {predicate} to {uri}"):
                write_deltalake(
                    uri if creating else table,
                    rows,
                    mode="error" if creating else "overwrite",
                    predicate=None if creating else predicate,
                    partition_by=partition_by,
                    storage_options=tuned(uri, options),
                    commit_properties=CommitProperties(
                        custom_metadata=metadata, **({"max_commit_retries": 0} if creating else {})
                    ),
                    **({"name": name, "description": description} if creating else {}),
                )
            return True
        except StorageUnavailable:
            raise
        except Exception as error:
            latest = open_table(uri, options)
            raced = latest is not None and (creating or latest.version() > table.version())
            if not raced or not (creating or isinstance(error, CommitFailedError)):
                raise  # the table did not move: not a race, delta-rs's own error
            if attempt == COMMIT_ATTEMPTS:
                raise ConcurrentWriters(
                    f"{uri}: other writers committed {predicate} first {attempt} times in a row; what they "
                    "committed is kept: run again once they are done"
                ) from error
            logger.warning("%s: another writer committed first (%s); trying again", uri, str(error).split("\n")[0])
            time.sleep(0.2 * attempt)
    return False


def quote(value: str) -> str:
    """A string literal for a Delta predicate."""
    return "'" + value.replace("'", "''") + "'"


def is_delta_table(fs: Any, root: str) -> bool:
    return fs.exists(f"{root.rstrip('/')}/{LOG}")
