"""Small helpers over fsspec, so every reader and writer takes any URL (local, s3://, gs://, memory://)."""

from __future__ import annotations

import hashlib
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

StorageOptions = dict[str, Any] | None


def filesystem(url: str, storage_options: StorageOptions = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it; credentials come from `storage_options`."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def read_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"no such file: {url}")
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes, storage_options: StorageOptions = None) -> None:
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def sha256_hex(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()
