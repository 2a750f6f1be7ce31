"""Reading a lake in Ray: footers read in tasks, then one Ray Data read task per planned read unit,
images decoded there a block at a time.

    listing (driver) ──footer tasks──► read units ──read tasks: fetch + decode──► blocks (id, pixels, error, partition)

Read tasks reserve no CPU: next to the model replicas they are light, and any reservation would
starve them whenever the actor pool holds every CPU of a node (a CPU-only run with --cpus-per-actor
equal to its cores); how many run at once is capped instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask
from ray.data.extensions import ArrowTensorArray

from fimood.lake.images import decode_cells
from fimood.lake.sources import Footer, ReadSpec, ReadUnit, read_blocks, read_footers

FOOTERS_PER_TASK = 512  # footers one task reads (in threads): planning a large selection is spread over the cluster
FOOTER_TASKS_IN_FLIGHT = 8  # at most this many at once, so a large plan neither floods the store nor Ray


class ShardDatasource(Datasource):
    """A Ray Data reader of read units (`fimood.lake.sources.plan_reads`): one read task per unit.

    Images are decoded in the read task, so actors receive uint8 pixels (N, C, H, W) and a GPU
    replica spends no time on decoding; rows that cannot be decoded carry their reason in `error`.
    """

    def __init__(self, units: list[ReadUnit], spec: ReadSpec, image_shape: tuple[int, int, int]):
        super().__init__()
        self.units, self.spec, self.image_shape = units, spec, tuple(image_shape)

    def estimate_inmemory_data_size(self) -> int:
        return sum(unit.rows for unit in self.units) * math.prod(self.image_shape)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        return [
            ReadTask(
                functools.partial(_read_block, unit, self.spec, self.image_shape),
                BlockMetadata(
                    num_rows=unit.rows,
                    size_bytes=unit.rows * math.prod(self.image_shape),
                    input_files=unit.paths,
                    exec_stats=None,
                ),
                per_task_row_limit=per_task_row_limit,
            )
            for unit in self.units
        ]


def _read_block(unit: ReadUnit, spec: ReadSpec, image_shape: tuple[int, int, int]) -> Iterator[pa.Table]:
    for block in read_blocks(unit, spec):
        images, decoded = decode_cells(block.cells, image_shape)
        errors = [read or error for read, error in zip(block.errors, decoded, strict=True)]
        yield pa.table(
            {
                "id": pa.array(block.ids, pa.string()),
                "pixels": ArrowTensorArray.from_numpy(images),
                "error": pa.array(errors, pa.string()),
                "partition": pa.array(np.full(len(block.ids), block.partition, np.int32)),
            }
        )


def footers_in_tasks(paths: list[str], spec: ReadSpec) -> list[Footer | str]:
    """`read_footers` of many shards, spread over Ray tasks (a few in flight): the driver only gathers
    what planning needs, in the paths' order."""
    chunks = [paths[start : start + FOOTERS_PER_TASK] for start in range(0, len(paths), FOOTERS_PER_TASK)]
    read: dict[int, list] = {}
    in_flight: dict[ray.ObjectRef, int] = {}

    def gather_one() -> None:
        (done,), _ = ray.wait(list(in_flight), num_returns=1)
        read[in_flight.pop(done)] = ray.get(done)

    for index, chunk in enumerate(chunks):
        if len(in_flight) == FOOTER_TASKS_IN_FLIGHT:
            gather_one()
        in_flight[_footers.remote(chunk, spec)] = index
    while in_flight:
        gather_one()
    return [footer for index in range(len(chunks)) for footer in read[index]]


@ray.remote(num_cpus=0)
def _footers(paths: list[str], spec: ReadSpec) -> list[Footer | str]:
    return read_footers(paths, spec)


def matrix(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column as one array, rows first."""
    return np.concatenate([chunk.to_numpy() for chunk in table.column(name).chunks])
