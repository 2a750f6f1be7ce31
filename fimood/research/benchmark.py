"""Engine benchmark: images/s of a plain batched forward+backward vs each per-sample engine, side by side."""

from __future__ import annotations

import functools
import multiprocessing
import platform
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fimood.engine import grad_norms
from fimood.models import LikelihoodModel, build_model

ENGINE_METHODS = ("loop", "vmap")


@dataclass(frozen=True)
class BenchmarkRow:
    model: str
    preset: str
    mode: str
    batch_size: int
    images_per_second: float  # median over repeats
    slowdown: float  # median seconds per image / plain's
    peak_memory_mib: float  # CUDA: peak allocated; CPU: extra peak resident memory of one step


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"
    )


def _plain_step(model: LikelihoodModel, x: torch.Tensor, seeds: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model.nll(x, seeds).sum().backward()


def _time(fn: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of `fn` after one warm-up call, and its peak CUDA memory in MiB."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(seconds), peak


def _setup(
    model_type: str, preset: str, batch_size: int, device: torch.device
) -> tuple[LikelihoodModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(model_type, preset).to(device)
    x = torch.rand(batch_size, *model.image_shape, device=device)
    model.initialize(x)
    return model, x, torch.arange(batch_size, device=device)


def _step(mode: str, model: LikelihoodModel, x: torch.Tensor, seeds: torch.Tensor, rows: int) -> Callable[[], object]:
    if mode == "plain":
        return functools.partial(_plain_step, model, x, seeds)
    return functools.partial(grad_norms, model, x[:rows], seeds[:rows], mode)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def _step_rss_mib(model_type: str, preset: str, batch_size: int, mode: str, rows: int) -> float:
    """Peak resident memory of one CPU step above the resident memory before it, in a fresh process.

    Linux's peak counter (VmHWM) is reset to the current size just before the step (clear_refs 5).
    """
    model, x, seeds = _setup(model_type, preset, batch_size, torch.device("cpu"))
    step = _step(mode, model, x, seeds, rows)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def run_benchmark(
    presets: list[str],
    methods: list[str],
    batch_size: int,
    loop_batch_size: int,
    repeats: int,
    device: str = "cpu",
    model_type: str = "glow",
) -> list[BenchmarkRow]:
    """Time the plain step and each engine on each preset, same model and data; `loop` may use fewer rows.

    CPU memory is measured in a separate fresh process per mode, so one mode's peak cannot hide another's.
    """
    target = torch.device(device)
    rows = []
    for preset in presets:
        model, x, seeds = _setup(model_type, preset, batch_size, target)
        per_image = {}
        for mode in ["plain", *methods]:
            n = loop_batch_size if mode == "loop" else batch_size
            seconds, peak = _time(_step(mode, model, x, seeds, n), target, repeats)
            if target.type == "cpu":
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    peak = pool.apply(_step_rss_mib, (model_type, preset, batch_size, mode, n))
            per_image[mode] = seconds / n
            rows.append(
                BenchmarkRow(
                    model=model_type,
                    preset=preset,
                    mode=mode,
                    batch_size=n,
                    images_per_second=n / seconds,
                    slowdown=per_image[mode] / per_image["plain"],
                    peak_memory_mib=peak,
                )
            )
    return rows


def format_rows(rows: list[BenchmarkRow], machine: str) -> str:
    lines = [
        f"machine: {machine}",
        f"{'model':<7}{'preset':<8}{'mode':<8}{'batch':>6}{'images/s':>12}{'vs plain':>10}{'peak MiB':>10}",
    ]
    for row in rows:
        peak = f"{row.peak_memory_mib:.0f}"
        lines.append(
            f"{row.model:<7}{row.preset:<8}{row.mode:<8}{row.batch_size:>6}{row.images_per_second:>12.1f}"
            f"{row.slowdown:>9.1f}x{peak:>10}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class PipelineBenchmarkRow:
    mode: str
    rows: int
    seconds: float
    gpu_utilization: float | None = None  # mean of nvidia-smi's samples during the run, percent

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


class GpuUtilization:
    """Samples the GPUs' utilisation with nvidia-smi every half second while a block runs; `mean` after."""

    def __enter__(self) -> GpuUtilization:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.5):
            output = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            self.samples += [float(value) for value in output.split()]

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def run_pipeline_benchmark(
    rows: int,
    preset: str,
    batch_size: int,
    num_actors: int,
    cpus_per_actor: int,
    partitions: int,
    repeats: int,
    workdir: str,
) -> list[PipelineBenchmarkRow]:
    """Rows/s of the in-process engine and of the Ray passes over the same Parquet rows, side by side.

    Modes: `in-process` (read + decode + features in this process); `fit (cold)` (starting Ray and the
    actors included) and `fit (warm)`; then `score, 1 partition` and `score, N partitions`, the score
    pass over the same `partitions` shards laid out in one folder or one folder each, alternated
    `repeats` times. Returns one row per run.
    """
    import numpy as np

    from fimood import passes
    from fimood.lake.images import decode_cells
    from fimood.lake.tables import read_parquet_table, write_image_parquet
    from fimood.method.features import featurize_rows
    from fimood.models import load_model, save_model

    torch.manual_seed(0)
    model = build_model("glow", preset)
    images = np.random.default_rng(0).integers(0, 256, (rows, *model.image_shape), dtype=np.uint8)
    model.initialize(torch.as_tensor(images[:64]).float() / 255)
    save_model(model, f"{workdir}/model")
    ids = [f"row-{i}" for i in range(rows)]
    per_shard = -(-rows // partitions)
    write_image_parquet(f"{workdir}/one", ids, images, rows_per_shard=per_shard)
    for shard, start in enumerate(range(0, rows, per_shard)):
        stop = start + per_shard
        write_image_parquet(f"{workdir}/many/part={shard:04d}", ids[start:stop], images[start:stop])
    results = []

    def timed(mode: str, run: Callable[[], object]) -> object:
        with GpuUtilization() as gpu:
            start = time.perf_counter()
            value = run()
            results.append(PipelineBenchmarkRow(mode, rows, time.perf_counter() - start, gpu.mean))
        return value

    def in_process() -> None:
        table = read_parquet_table(f"{workdir}/one")
        loaded = load_model(f"{workdir}/model").to("cuda" if torch.cuda.is_available() else "cpu")
        cells = table.column("image").to_pylist()
        for first in range(0, rows, batch_size):
            decoded, errors = decode_cells(cells[first : first + batch_size], loaded.image_shape)
            featurize_rows(loaded, ids[first : first + batch_size], decoded, errors)

    timed("in-process", in_process)
    config = passes.PipelineConfig(batch_size=batch_size, num_actors=num_actors, cpus_per_actor=cpus_per_actor)
    for mode in ("fit (cold)", "fit (warm)"):
        detector, _ = timed(mode, lambda: passes.fit(f"{workdir}/model", f"{workdir}/one", config))
    detector.save(f"{workdir}/detector")
    for repeat in range(repeats):
        for mode, data in (("score, 1 partition", "one"), (f"score, {partitions} partitions", "many")):
            out = f"{workdir}/scores-{data}-{repeat}"
            timed(
                mode, lambda data=data, out=out: passes.score(f"{workdir}/detector", f"{workdir}/{data}", out, config)
            )
    return results


@dataclass(frozen=True)
class ReduceBenchmark:
    rows: int
    features: int
    max_calibration_rows: int
    calibration_rows: int  # kept by the reduce; the others past the cap joined the fit statistics
    seconds: float
    streaming_peak_mib: float  # of numpy and Python allocations while rows stream in (tracemalloc)
    finish_peak_mib: float  # while the detector is fitted and calibrated from the reduce
    bound_mib: float  # `FitReduce.memory_bound_bytes`: what streaming may hold, whatever the rows

    def __str__(self) -> str:
        return (
            f"fit reduce: {self.rows:,} rows x {self.features} features in {self.seconds:.1f} s "
            f"({self.rows / self.seconds:,.0f} rows/s); calibration rows kept {self.calibration_rows:,} "
            f"(cap {self.max_calibration_rows:,}; the rest joined the fit statistics)\n"
            f"peak driver memory: streaming {self.streaming_peak_mib:.0f} MiB (bound {self.bound_mib:.0f} MiB, "
            f"independent of the rows), finishing the detector {self.finish_peak_mib:.0f} MiB"
        )


def run_reduce_benchmark(
    rows: int, features: int, max_calibration_rows: int, calibration_fraction: float, batch_size: int
) -> ReduceBenchmark:
    """Stream `rows` synthetic feature rows through `FitReduce` as the fit pass does; measure its peak memory."""
    import tracemalloc

    import numpy as np

    from fimood.method.reduce import FitReduce

    rng = np.random.default_rng(0)
    tracemalloc.start()
    start = time.perf_counter()
    reduce = FitReduce(features, calibration_fraction, max_calibration_rows)
    for first in range(0, rows, batch_size):
        n = min(batch_size, rows - first)
        reduce.add([f"row-{i}" for i in range(first, first + n)], rng.normal(size=(n, features)), rng.normal(size=n))
    _, streaming_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    reduce.finish(0.05)
    _, finish_peak = tracemalloc.get_traced_memory()
    seconds = time.perf_counter() - start
    tracemalloc.stop()
    return ReduceBenchmark(
        rows,
        features,
        max_calibration_rows,
        reduce.calibration_rows,
        seconds,
        streaming_peak / 2**20,
        finish_peak / 2**20,
        FitReduce.memory_bound_bytes(features, max_calibration_rows, batch_size) / 2**20,
    )
