"""Input shards on any fsspec URL: listing with Hive partitions, and reading one shard into rows.

A shard is one Parquet file (an image column of encoded bytes or fixed-shape arrays) or one image
file. Each row gets a stable id: the id column when there is one, else `<shard path>#<row index>`
(for image files, the path itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fimood.storage import StorageOptions, filesystem

FORMATS = {"parquet": (".parquet",), "images": (".png", ".jpg", ".jpeg")}


@dataclass(frozen=True)
class Shard:
    path: str  # inside the filesystem, without the protocol
    partition: tuple[tuple[str, str], ...]  # Hive-style (key, value) pairs from the folders above it


def list_shards(url: str, input_format: str = "parquet", storage_options: StorageOptions = None) -> list[Shard]:
    """Every shard below `url` (or `url` itself), in path order, with its Hive partition values."""
    if input_format not in FORMATS:
        raise ValueError(f"input_format must be one of {sorted(FORMATS)}, got {input_format!r}")
    fs, root = filesystem(url, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"no such file or folder: {url}")
    root = root.rstrip("/")
    paths = sorted(fs.find(root)) if fs.isdir(root) else [root]
    shards = []
    for path in paths:
        relative = path[len(root) :].strip("/").split("/")
        if not path.lower().endswith(FORMATS[input_format]) or any(part.startswith((".", "_")) for part in relative):
            continue
        partition = tuple(tuple(part.split("=", 1)) for part in relative[:-1] if "=" in part)
        shards.append(Shard(path=path, partition=partition))
    if not shards:
        raise FileNotFoundError(f"no {input_format} shards ({', '.join(FORMATS[input_format])}) under {url}")
    return shards


def read_shard(
    shard: Shard,
    url: str,
    *,
    input_format: str = "parquet",
    image_column: str = "image",
    id_column: str | None = "id",
    storage_options: StorageOptions = None,
) -> pa.Table:
    """One shard as rows with columns `id` (string), `image` (bytes or a fixed-shape array) and its partition keys."""
    fs, _ = filesystem(url, storage_options)
    if input_format == "images":
        columns = {"id": pa.array([shard.path]), "image": pa.array([fs.cat_file(shard.path)], pa.binary())}
    else:
        with fs.open(shard.path, "rb") as handle:
            table = pq.read_table(handle)
        if image_column not in table.column_names:
            raise ValueError(f"{shard.path}: expected an image column {image_column!r}, found {table.column_names}")
        if id_column is not None and id_column in table.column_names:
            ids = pa.array([str(value) for value in table.column(id_column).to_pylist()], pa.string())
        elif id_column is not None and id_column != "id":
            raise ValueError(f"{shard.path}: expected an id column {id_column!r}, found {table.column_names}")
        else:
            ids = pa.array([f"{shard.path}#{row}" for row in range(table.num_rows)], pa.string())
        columns = {"id": ids, "image": table.column(image_column)}
    rows = len(columns["id"])
    for key, value in shard.partition:
        columns[key] = pa.array(np.full(rows, value, dtype=object), pa.string())
    return pa.table(columns)
