"""Image cells: encoded bytes (PNG, JPEG, ...) or uint8 arrays, to and from uint8 (C, H, W) pixels.

Decoding is where a bad row becomes an error message instead of a crash.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_MODES = {1: "L", 3: "RGB"}
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
COLOUR_MODES = ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")  # palette images ("P") convert either way


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) with C in {1, 3} → PNG bytes."""
    channels = image.shape[0]
    pixels = image[0] if channels == 1 else np.transpose(image, (1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes | None, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) → uint8 (C, H, W); ValueError says why a row is unusable.

    The reasons are short and the same every run (no object addresses), so errors can be counted by
    reason. The size is checked from the header before any pixel is decoded, so an image that claims
    huge dimensions (a decompression bomb) is refused, never expanded.
    """
    channels, height, width = image_shape
    if data is None or len(data) == 0:
        raise ValueError("image is missing")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (width, height):
                raise ValueError(f"image is {image.size[0]}x{image.size[1]}, the model expects {width}x{height}")
            if channels == 1 and image.mode in COLOUR_MODES:
                raise ValueError("image is in colour, the model expects grey images")
            if channels == 3 and image.mode in GREY_MODES:
                raise ValueError("image is grey, the model expects colour images")
            pixels = np.asarray(image.convert(IMAGE_MODES[channels]))
    except Image.DecompressionBombError:
        raise ValueError("image cannot be decoded: its header claims too many pixels (decompression bomb)") from None
    except UnidentifiedImageError:
        raise ValueError("image cannot be decoded: not a known image format") from None
    except (OSError, SyntaxError):
        raise ValueError("image cannot be decoded: truncated or corrupt") from None
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


def shape_of(cell: object) -> tuple[int, int, int]:
    """The (C, H, W) an image cell decodes to best: grey images one channel, any other mode three."""
    if cell is None:
        raise ValueError("there is no image to take a shape from")
    if isinstance(cell, bytes | bytearray):
        try:
            with Image.open(io.BytesIO(cell)) as image:
                return (1 if image.mode in GREY_MODES else 3, image.size[1], image.size[0])
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
            raise ValueError("image cannot be decoded") from None
    shape = np.asarray(cell).shape
    if len(shape) == 2:
        return (1, *shape)
    return tuple(shape) if shape[0] in (1, 3) else (shape[2], shape[0], shape[1])
