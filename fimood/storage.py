"""Small helpers over fsspec, so every reader and writer takes any URL (local, s3://, gs://, memory://)."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

StorageOptions = dict[str, Any] | None


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
    if not fs.exists(path):
        raise FileNotFoundError(f"no such file: {url}")
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes, storage_options: StorageOptions = None) -> None:
    """Write a file whole: readers see all of it or none (see `write_file`)."""
    write_file(*filesystem(url, storage_options), data)


def write_file(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a file whole: one PUT on object stores; locally, a temporary file renamed into place."""
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
