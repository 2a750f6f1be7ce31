"""Image tables in Parquet over any fsspec URL: encode/decode rows, read shards, write results."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from fimood.sources import list_shards
from fimood.storage import StorageOptions, filesystem, join

IMAGE_MODES = {1: "L", 3: "RGB"}


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) with C in {1, 3} → PNG bytes."""
    channels = image.shape[0]
    pixels = image[0] if channels == 1 else np.transpose(image, (1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes | None, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) → uint8 (C, H, W); ValueError says why a row is unusable."""
    channels, height, width = image_shape
    if data is None or len(data) == 0:
        raise ValueError("image is missing")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (width, height):
                raise ValueError(f"image is {image.size[0]}x{image.size[1]}, the model expects {width}x{height}")
            pixels = np.asarray(image.convert(IMAGE_MODES[channels]))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image cannot be decoded: {error}") from None
    return pixels[None] if channels == 1 else np.transpose(pixels, (2, 0, 1))


def decode_pixels(value: object, image_shape: tuple[int, int, int]) -> np.ndarray:
    """An image cell, encoded bytes or a uint8 array of shape (C, H, W), (H, W, C) or (H, W), → uint8 (C, H, W)."""
    if value is None or isinstance(value, bytes | bytearray):
        return decode_image(value, image_shape)
    pixels = np.asarray(value)
    if pixels.dtype == object:
        pixels = np.array(pixels.tolist())
    if not np.issubdtype(pixels.dtype, np.integer) or (pixels.size and (pixels.min() < 0 or pixels.max() > 255)):
        raise ValueError(f"pixel arrays must hold integers in 0..255, got dtype {pixels.dtype}")
    channels, height, width = image_shape
    for candidate in (pixels, np.moveaxis(pixels, -1, 0) if pixels.ndim == 3 else pixels, pixels[None]):
        if candidate.shape == tuple(image_shape):
            return candidate.astype(np.uint8)
    raise ValueError(f"pixel array has shape {pixels.shape}, the model expects {(channels, height, width)}")


def decode_cells(cells: list, image_shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str | None]]:
    """Decode a column of image cells: uint8 (N, C, H, W), zero where a cell fails, and each row's error or None."""
    images = np.zeros((len(cells), *image_shape), dtype=np.uint8)
    errors: list[str | None] = [None] * len(cells)
    for row, cell in enumerate(cells):
        try:
            images[row] = decode_pixels(cell, image_shape)
        except ValueError as error:
            errors[row] = str(error)
    return images, errors


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
    image_shape: tuple[int, int, int],
    *,
    id_column: str = "id",
    image_column: str = "image",
    limit: int | None = None,
    storage_options: StorageOptions = None,
) -> ImageTable:
    """Read a Parquet file or folder of shards (in file-name order) and decode its image column (bytes or arrays)."""
    table = read_parquet_table(url, storage_options)
    for column in (id_column, image_column):
        if column not in table.column_names:
            raise ValueError(f"{url}: expected a column {column!r}, found {table.column_names}")
    if limit is not None:
        table = table.slice(0, limit)
    ids = [str(value) for value in table.column(id_column).to_pylist()]
    images, errors = decode_cells(table.column(image_column).to_pylist(), image_shape)
    labels = table.column("label").to_numpy() if "label" in table.column_names else None
    return ImageTable(ids=ids, images=images, errors=errors, labels=labels)


def read_parquet_table(url: str, storage_options: StorageOptions = None) -> pa.Table:
    """A Parquet file, or every shard below a folder in path order (`_` and `.` names skipped), as one table."""
    fs, _ = filesystem(url, storage_options)
    files = [shard.path for shard in list_shards(url, "parquet", storage_options)]
    return pads.dataset(files, filesystem=fs, format="parquet").to_table()


def write_table_atomic(table: pa.Table, url: str, storage_options: StorageOptions = None) -> None:
    """Write one Parquet file so that readers see all of it or none: write aside, then move into place."""
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    temporary = f"{parent}/.tmp-{uuid.uuid4().hex}.parquet"
    with fs.open(temporary, "wb") as handle:
        pq.write_table(table, handle)
    fs.mv(temporary, path)
