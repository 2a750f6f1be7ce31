"""Small helpers over fsspec, so every reader and writer takes any URL (local, s3://, gs://, memory://)."""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

StorageOptions = dict[str, Any] | None
T = TypeVar("T")
logger = logging.getLogger(__name__)

RETRY_SECONDS_ENV = "FIMOOD_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0


class StorageUnavailable(RuntimeError):
    """The object store stayed unreachable past the retry deadline (`FIMOOD_STORAGE_RETRY_SECONDS`)."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the store did not answer, or cut a stream short", worth another try."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
    try:
        import botocore.exceptions

        errors += [
            botocore.exceptions.ConnectionError,
            botocore.exceptions.HTTPClientError,
            botocore.exceptions.ResponseStreamingError,
        ]
    except ImportError:
        pass
    try:
        import aiohttp

        errors += [aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError]
    except ImportError:
        pass
    return tuple(errors)


TRANSIENT = _transient_errors()


def transient(error: BaseException) -> bool:
    """True for an error worth another try: the store did not answer, cut a read short, or throttled the
    request (s3fs turns S3's SlowDown and 503 into `OSError(EBUSY)`); any other error is final."""
    return isinstance(error, TRANSIENT) or (isinstance(error, OSError) and error.errno == errno.EBUSY)


def retry_seconds() -> float:
    return float(os.environ.get(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS))


class Patience:
    """Growing waits between tries of one action, for at most the retry time; then `StorageUnavailable`.

    The store's client retries a few seconds by itself; this rides out an outage of minutes (a
    restarting endpoint, a network blip, a throttled prefix) and then stops with one clear error.
    """

    def __init__(self, what: str):
        self.what, self.seconds = what, retry_seconds()
        self.deadline, self.delay = time.monotonic() + self.seconds, 1.0

    def wait_after(self, error: BaseException) -> None:
        if time.monotonic() + self.delay > self.deadline:
            raise StorageUnavailable(
                f"{self.what}: the storage did not answer for {self.seconds:g} s ({error}); what was committed "
                f"before is kept: run again when it is back (set {RETRY_SECONDS_ENV} to wait longer)"
            ) from None
        logger.warning("%s: the storage did not answer (%s); trying again in %.0f s", self.what, error, self.delay)
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, 15.0)


def retrying(action: Callable[[], T], what: str) -> T:
    """`action()`, tried again with growing waits while the store does not answer, for a bounded time."""
    patience = Patience(what)
    while True:
        try:
            return action()
        except Exception as error:
            if not transient(error):
                raise
            patience.wait_after(error)


def resumable(items_after: Callable[[int], Iterable[T]], size: Callable[[T], int], what: str) -> Iterator[T]:
    """The items of a stream, read again after the part already yielded when the store cuts it short.

    `items_after(done)` opens the stream past its first `done` units (rows, files); `size(item)` counts
    an item's units. Each cut waits as `retrying` does; progress since the last cut gives the stream
    the whole retry time again, so only a store that stays away stops it.
    """
    done, patience = 0, Patience(what)
    while True:
        resumed_at = done
        try:
            for item in items_after(done):
                done += size(item)
                yield item
            return
        except Exception as error:
            if not transient(error):
                raise
            if done > resumed_at:
                patience = Patience(what)
            patience.wait_after(error)


class RetryingFileSystem:
    """An fsspec filesystem whose every call is `retrying`; the local one needs none and is used as it is."""

    def __init__(self, fs: AbstractFileSystem):
        self.fs = fs

    def __getattr__(self, name: str):
        attribute = getattr(self.fs, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            return retrying(lambda: attribute(*args, **kwargs), f"{name} {args[0] if args else ''}".strip())

        return call

    def __reduce__(self):
        return RetryingFileSystem, (self.fs,)


def resilient(fs: AbstractFileSystem) -> AbstractFileSystem:
    return fs if isinstance(fs, LocalFileSystem | RetryingFileSystem) else RetryingFileSystem(fs)


def filesystem(url: str, storage_options: StorageOptions = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it; credentials come from `storage_options`."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def absolute_url(url: str) -> str:
    """A local path made absolute (so it works from any working directory); any other URL as it is."""
    fs, path = fsspec.core.url_to_fs(url)
    return os.path.abspath(path) if isinstance(fs, LocalFileSystem) and "://" not in url else url


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def overlaps(url_a: str, url_b: str, storage_options: StorageOptions = None) -> bool:
    """True when the two URLs name the same place, or one lies inside the other."""
    fs_a, path_a = filesystem(url_a, storage_options)
    fs_b, path_b = filesystem(url_b, storage_options)
    if type(fs_a) is not type(fs_b):
        return False
    a, b = _canonical(fs_a, path_a), _canonical(fs_b, path_b)
    return a == b or a.startswith(f"{b}/") or b.startswith(f"{a}/")


def _canonical(fs: AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return os.path.realpath(path)
    return path.rstrip("/")


def read_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    fs = resilient(fs)
    if not fs.exists(path):
        raise FileNotFoundError(f"no such file: {url}")
    return fs.cat_file(path)


def parse_json(data: bytes, url: str, *, fix: str) -> Any:
    """The JSON document read from `url`; anything else (truncated, half-written, a planted pickle) is one
    clear error naming the file and `fix`."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(
            f"{url} is not valid JSON (half-written, truncated, or not written by fimood); {fix}"
        ) from None


def parse_safetensors(data: bytes, load: Callable[[bytes], T], url: str, *, fix: str) -> T:
    """`load` (safetensors' numpy or torch loader) of bytes read from `url`, never unpickled; anything else
    is one clear error naming the file and `fix`."""
    try:
        return load(data)
    except Exception as error:  # safetensors raises its own SafetensorError on any malformed header
        raise ValueError(f"{url} is not a readable safetensors file ({error}); {fix}") from None


def write_bytes(url: str, data: bytes, storage_options: StorageOptions = None) -> None:
    """Write a file whole: readers see all of it or none (see `write_file`)."""
    write_file(*filesystem(url, storage_options), data)


def write_file(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a file whole: one PUT on object stores (retried while the store is unreachable); locally, a
    temporary file renamed into place."""
    fs = resilient(fs)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    temporary = f"{parent}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(temporary, data)
    fs.mv(temporary, path)


def sha256_hex(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()
