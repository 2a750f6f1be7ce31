"""The one plotting helper of the reports (the monitor's and the studies'): matplotlib off-screen, figures to PNG."""

from __future__ import annotations

import io
from types import ModuleType
from typing import TYPE_CHECKING

from fimood.storage import StorageOptions, write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend: reports are drawn on headless machines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure: Figure, dpi: int) -> bytes:
    """Lay out, render as PNG and free the figure."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(figure)
    return buffer.getvalue()


def write_figure(figure: Figure, url: str, dpi: int, storage_options: StorageOptions = None) -> None:
    """Write a figure as PNG to any fsspec URL, and free it."""
    write_bytes(url, png_bytes(figure, dpi), storage_options)
