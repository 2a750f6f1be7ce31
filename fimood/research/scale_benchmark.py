"""Many small partitions against one large one, over a real S3 endpoint on loopback (moto's server):
the score pass's rows/s, and the driver's CPU-seconds and peak memory, side by side in one run."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SHARD_ROWS = 10_000  # the large partition's rows per shard
WRITE_THREADS = 16


@dataclass(frozen=True)
class ScaleRow:
    layout: str
    partitions: int
    rows: int
    seconds: float
    driver_cpu_seconds: float  # user + system time of this process (the driver) during the pass
    driver_peak_mib: float  # the driver's resident memory at its highest during the pass, above its start

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds

    def __str__(self) -> str:
        per_thousand = f" ({self.driver_cpu_seconds * 1000 / self.partitions:.1f} per 1,000 partitions)"
        return (
            f"{self.layout:<28}{self.seconds:>8.1f} s{self.rows_per_second:>9.1f} rows/s"
            f"   driver: {self.driver_cpu_seconds:>6.1f} CPU-s{per_thousand if self.partitions > 1 else ''}, "
            f"peak +{self.driver_peak_mib:.0f} MiB"
        )


class LoopbackS3:
    """moto's S3 server on a free loopback port, in a process of its own, for as long as the block runs."""

    def __enter__(self) -> dict:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start (pip install 'moto[server]')") from None
                time.sleep(0.1)
        return {
            "key": "benchmark",
            "secret": "benchmark",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-west-2"},
        }

    def __exit__(self, *exc_info) -> None:
        self.server.terminate()
        self.server.wait()


class PeakRss:
    """The process's highest resident memory while the block runs (sampled every 20 ms), above its start."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss_mib()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.02)

    def __exit__(self, *exc_info) -> None:
        self.running = False
        self.thread.join()

    @property
    def above_start(self) -> float:
        return self.peak - self.start


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_scale_benchmark(
    rows: int, partitions: int, preset: str, batch_size: int, repeats: int, workdir: str
) -> list[ScaleRow]:
    """Score the same random images laid out as one partition and as `partitions` partitions, on loopback S3,
    alternated `repeats` times; the detector is fitted beforehand on other rows, in local files."""
    import torch
    from fsspec.core import url_to_fs

    from fimood import passes
    from fimood.lake.images import encode_png
    from fimood.lake.tables import parquet_bytes, write_image_parquet
    from fimood.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model("glow", preset)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (rows + 1024, *model.image_shape), dtype=np.uint8)
    model.initialize(torch.as_tensor(images[:64]).float() / 255)
    save_model(model, f"{workdir}/model")
    write_image_parquet(f"{workdir}/fit", [f"fit-{i}" for i in range(1024)], images[rows:])
    config = passes.PipelineConfig(batch_size=batch_size, num_actors=1, cpus_per_actor=2)
    detector, _ = passes.fit(f"{workdir}/model", f"{workdir}/fit", config)
    detector.save(f"{workdir}/detector")
    cells = pa.array([encode_png(image) for image in images[:rows]], pa.binary())
    ids = pa.array([f"row-{i}" for i in range(rows)])
    results = []
    with LoopbackS3() as options:
        fs, _ = url_to_fs("s3://bench", **options)
        fs.mkdir("bench")
        per_partition = -(-rows // partitions)
        files = {f"bench/one/part-{i:05d}.parquet": (i, SHARD_ROWS) for i in range(0, rows, SHARD_ROWS)}
        files |= {
            f"bench/many/part={i // per_partition:05d}/part-0.parquet": (i, per_partition)
            for i in range(0, rows, per_partition)
        }
        with ThreadPoolExecutor(WRITE_THREADS) as pool:
            list(
                pool.map(
                    lambda item: fs.pipe_file(
                        item[0], parquet_bytes(pa.table({"id": ids.slice(*item[1]), "image": cells.slice(*item[1])}))
                    ),
                    files.items(),
                )
            )
        config = passes.PipelineConfig(batch_size=batch_size, num_actors=1, cpus_per_actor=2, storage_options=options)
        for repeat in range(repeats):
            for layout, count in (("one", 1), ("many", partitions)):
                with PeakRss() as memory:
                    cpu, start = _cpu_seconds(), time.perf_counter()
                    passes.score(
                        f"{workdir}/detector", f"s3://bench/{layout}", f"s3://bench/scores-{layout}-{repeat}", config
                    )
                    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
                name = f"{count:,} partition{'s' if count > 1 else ''} x {-(-rows // count):,} rows"
                results.append(ScaleRow(name, count, rows, seconds, cpu, memory.above_start))
    return results
