"""Parquet image tables over fsspec; each kind of bad row becomes an error message, never a crash."""

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fimood.lake.images import decode_cells, decode_image, encode_png
from fimood.lake.tables import read_image_parquet, write_image_parquet
from fimood.storage import filesystem


def test_png_round_trip_for_grey_and_colour():
    rng = np.random.default_rng(0)
    for shape in [(1, 5, 7), (3, 5, 7)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(decode_image(encode_png(image), shape), image)


def test_jpeg_bytes_decode_too():
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 128, np.uint8)).save(buffer, format="JPEG")
    assert decode_image(buffer.getvalue(), (1, 4, 4)).shape == (1, 4, 4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "missing"),
        (b"", "missing"),
        (b"not an image", "cannot be decoded"),
        (encode_png(np.zeros((1, 9, 9), np.uint8)), "image is 9x9, the model expects 8x8"),
    ],
)
def test_bad_image_bytes_raise_a_reason(data, message):
    with pytest.raises(ValueError, match=message):
        decode_image(data, (1, 8, 8))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width × height grey pixels, with next to no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_an_image_claiming_huge_dimensions_is_refused_before_decoding():
    bomb = png_claiming(30_000, 30_000)
    assert len(bomb) < 120
    with pytest.raises(ValueError, match="decompression bomb"):
        decode_image(bomb, (1, 8, 8))
    _, errors = decode_cells([bomb, encode_png(np.zeros((1, 8, 8), np.uint8))], (1, 8, 8))
    assert errors[1] is None and "decompression bomb" in errors[0]


def test_the_same_bad_row_gives_the_same_short_reason_every_time():
    truncated = encode_png(np.random.default_rng(0).integers(0, 256, (1, 8, 8), dtype=np.uint8))[:-30]
    for data, reason in [(b"junk", "not a known image format"), (truncated, "truncated or corrupt")]:
        _, errors = decode_cells([data, bytes(data)], (1, 8, 8))
        assert errors == [f"image cannot be decoded: {reason}"] * 2  # no object address, nothing that varies


def test_a_grey_image_for_a_colour_model_and_the_reverse_are_error_rows():
    grey, colour = encode_png(np.zeros((1, 8, 8), np.uint8)), encode_png(np.zeros((3, 8, 8), np.uint8))
    _, errors = decode_cells([grey, colour], (3, 8, 8))
    assert errors == ["image is grey, the model expects colour images", None]
    _, errors = decode_cells([grey, colour], (1, 8, 8))
    assert errors == [None, "image is in colour, the model expects grey images"]


def test_write_then_read_shards_keeps_every_row_in_order():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (25, 1, 8, 8), dtype=np.uint8)
    ids = [f"row-{i}" for i in range(25)]
    shards = write_image_parquet("memory://tables/a", ids, images, np.arange(25), rows_per_shard=10)
    assert len(shards) == 3
    table = read_image_parquet("memory://tables/a", (1, 8, 8))
    assert table.ids == ids and table.errors == [None] * 25
    np.testing.assert_array_equal(table.images, images)
    np.testing.assert_array_equal(table.labels, np.arange(25))


def test_bad_rows_are_kept_with_an_error():
    good = encode_png(np.zeros((1, 8, 8), np.uint8))
    fs, path = filesystem("memory://tables/bad/part-0.parquet")
    with fs.open(path, "wb") as handle:
        pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [good, b"junk", None]}), handle)
    table = read_image_parquet("memory://tables/bad", (1, 8, 8))
    assert table.ids == ["a", "b", "c"]
    assert table.ok.tolist() == [True, False, False]
    assert "cannot be decoded" in table.errors[1] and "missing" in table.errors[2]


def test_missing_column_or_path_is_a_clear_error():
    write_image_parquet("memory://tables/c", ["a"], np.zeros((1, 1, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="expected a column 'pixels'"):
        read_image_parquet("memory://tables/c", (1, 8, 8), image_column="pixels")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_image_parquet("memory://tables/nothing-here", (1, 8, 8))


def test_pixel_array_cells_are_read_like_encoded_ones():
    images = np.random.default_rng(2).integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    fs, path = filesystem("memory://tables/arrays/part-0.parquet")
    with fs.open(path, "wb") as handle:
        pq.write_table(pa.table({"id": ["a", "b"], "image": [image[0].tolist() for image in images]}), handle)
    table = read_image_parquet("memory://tables/arrays", (1, 8, 8))
    assert table.errors == [None, None]
    np.testing.assert_array_equal(table.images, images)
