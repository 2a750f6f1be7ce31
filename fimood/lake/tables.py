"""Image tables in Parquet over any fsspec URL: rows of (id, encoded image, label), read and written whole."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from fimood.lake.images import decode_cells, encode_png, shape_of
from fimood.lake.sources import list_shards
from fimood.storage import StorageOptions, filesystem, join, write_bytes


@dataclass
class ImageTable:
    """Decoded rows; rows that could not be decoded keep a zero image and an error message."""

    ids: list[str]
    images: np.ndarray  # (N, C, H, W) uint8
    errors: list[str | None]
    labels: np.ndarray | None = None  # (N,)

    @property
    def ok(self) -> np.ndarray:
        """(N,) True for rows that decoded."""
        return np.array([error is None for error in self.errors], dtype=bool)


def write_image_parquet(
    url: str,
    ids: list[str],
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    rows_per_shard: int = 10_000,
    storage_options: StorageOptions = None,
) -> list[str]:
    """Write uint8 (N, C, H, W) images as PNG bytes in Parquet shards `part-00000.parquet`, ...; returns their URLs."""
    fs, path = filesystem(url, storage_options)
    fs.makedirs(path, exist_ok=True)
    shard_urls = []
    for shard, start in enumerate(range(0, len(ids), rows_per_shard)):
        stop = start + rows_per_shard
        columns = {
            "id": pa.array(ids[start:stop], pa.string()),
            "image": pa.array([encode_png(image) for image in images[start:stop]], pa.binary()),
        }
        if labels is not None:
            columns["label"] = pa.array(np.asarray(labels[start:stop]), pa.int64())
        shard_url = join(url, f"part-{shard:05d}.parquet")
        write_table_atomic(pa.table(columns), shard_url, storage_options)
        shard_urls.append(shard_url)
    return shard_urls


def read_image_parquet(
    url: str,
    image_shape: tuple[int, int, int] | None = None,
    *,
    id_column: str = "id",
    image_column: str = "image",
    limit: int | None = None,
    storage_options: StorageOptions = None,
) -> ImageTable:
    """Read a Parquet file or folder of shards (in file-name order) and decode its image column (bytes or arrays).

    Images are decoded to `image_shape` (C, H, W); without one, to the shape of the first image in the table.
    """
    table = read_parquet_table(url, storage_options)
    for column in (id_column, image_column):
        if column not in table.column_names:
            raise ValueError(f"{url}: expected a column {column!r}, found {table.column_names}")
    if limit is not None:
        table = table.slice(0, limit)
    ids = [str(value) for value in table.column(id_column).to_pylist()]
    cells = table.column(image_column).to_pylist()
    images, errors = decode_cells(cells, image_shape or shape_of(next((c for c in cells if c is not None), None)))
    labels = table.column("label").to_numpy() if "label" in table.column_names else None
    return ImageTable(ids=ids, images=images, errors=errors, labels=labels)


def read_parquet_table(url: str, storage_options: StorageOptions = None) -> pa.Table:
    """A Parquet file, or every shard below a folder in path order (`_` and `.` names skipped), as one table."""
    fs, _ = filesystem(url, storage_options)
    files = [shard.path for shard in list_shards(url, "parquet", storage_options)]
    return pads.dataset(files, filesystem=fs, format="parquet").to_table()


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def write_table_atomic(table: pa.Table, url: str, storage_options: StorageOptions = None) -> None:
    """Write one Parquet file so that readers see all of it or none."""
    write_bytes(url, parquet_bytes(table), storage_options)
