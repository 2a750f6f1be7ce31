"""The score pass on real lake layouts: every row of every input folder comes out in its own partition
of the score table, exactly once, after a first run, after `--resume` on a changed lake and after a
run killed mid-commit; nothing fimood did not write is ever replaced or read."""

from __future__ import annotations

import shutil
import time
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_scores
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fimood import passes
from fimood.lake import delta, schema
from fimood.lake.images import encode_png
from fimood.lake.score_table import Lineage, ScoreTable, folder_of
from fimood.method.detector import DetectorArtifact
from fimood.onboarding.datasets import load_source
from fimood.passes import score_pass

MNIST = load_source("mnist", limit=400)
PNGS = [encode_png(image) for image in MNIST.images]


def write_shard(path: Path, ids: list[str], with_id_column: bool = True) -> list[str]:
    """A Parquet shard of MNIST images; returns the ids its rows will have."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [PNGS[zlib.crc32(i.encode()) % len(PNGS)] for i in ids]
    columns = {"id": ids, "image": images} if with_id_column else {"image": images}
    pq.write_table(pa.table(columns), path)
    return ids if with_id_column else [f"{path}#{row}" for row in range(len(ids))]


def ids_by_folder(out: Path) -> dict[str, Counter]:
    """Committed ids per input folder ('' for the data URL itself), counted, as a Delta reader sees them."""
    found: dict[str, Counter] = {}
    for row in read_scores(str(out)).select(["partition", "id"]).to_pylist():
        found.setdefault(folder_of(row["partition"]), Counter())[row["id"]] += 1
    return found


def test_mixed_depth_partitions_keep_every_row(lake, tmp_path):
    """date=1/a, date=1/hour=2/b, date=1/z: three shards, two folders, every row once in its own folder."""
    data = tmp_path / "lake"
    expected = {
        "date=1": write_shard(data / "date=1" / "a.parquet", [f"a{i}" for i in range(5)])
        + write_shard(data / "date=1" / "z.parquet", [f"z{i}" for i in range(4)]),
        "date=1/hour=2": write_shard(data / "date=1" / "hour=2" / "b.parquet", [f"b{i}" for i in range(3)]),
    }
    summary = passes.score(lake["detector"], str(data), str(tmp_path / "out"), passes.PipelineConfig())
    assert summary.rows == 12 and [p.folder for p in summary.partitions] == ["date=1", "date=1/hour=2"]
    assert ids_by_folder(tmp_path / "out") == {folder: Counter(ids) for folder, ids in expected.items()}
    table = read_scores(str(tmp_path / "out"))
    assert table.num_rows == 12 and set(table.column("partition").to_pylist()) == {"date=1", "date=1/hour=2"}


def test_folders_without_keys_and_the_root_itself_are_mirrored(lake, tmp_path):
    data = tmp_path / "lake"
    expected = {
        "": write_shard(data / "top.parquet", ["t0", "t1"]),
        "raw/cam-1": write_shard(data / "raw" / "cam-1" / "x.parquet", ["c0"], with_id_column=False),
    }
    (data / "empty" / "deeper").mkdir(parents=True)
    passes.score(lake["detector"], str(data), str(tmp_path / "out"), passes.PipelineConfig())
    assert ids_by_folder(tmp_path / "out") == {folder: Counter(ids) for folder, ids in expected.items()}


def test_a_late_shard_is_scored_on_resume(lake, tmp_path):
    """The nightly --resume run: a shard that lands after its partition was committed is scored."""
    data, out, config = tmp_path / "lake", str(tmp_path / "out"), passes.PipelineConfig()
    first = write_shard(data / "date=1" / "a.parquet", [f"a{i}" for i in range(6)])
    assert passes.score(lake["detector"], str(data), out, config, resume=True).rows == 6
    late = write_shard(data / "date=1" / "b.parquet", [f"b{i}" for i in range(4)])
    again = passes.score(lake["detector"], str(data), out, config, resume=True)
    assert again.rows == 10 and not again.skipped
    assert ids_by_folder(tmp_path / "out") == {"date=1": Counter(first + late)}
    unchanged = passes.score(lake["detector"], str(data), out, config, resume=True)
    assert unchanged.rows == 0 and [p.folder for p in unchanged.skipped] == ["date=1"]


def test_a_rewritten_or_removed_shard_is_scored_again_on_resume(lake, tmp_path):
    data, out, config = tmp_path / "lake", str(tmp_path / "out"), passes.PipelineConfig()
    write_shard(data / "d" / "a.parquet", ["a0", "a1"])
    kept = write_shard(data / "d" / "b.parquet", ["b0"])
    passes.score(lake["detector"], str(data), out, config, resume=True)
    time.sleep(0.01)  # a new modification time, as a real rewrite would have
    rewritten = write_shard(data / "d" / "a.parquet", ["a0", "a1", "a2"])
    assert passes.score(lake["detector"], str(data), out, config, resume=True).rows == 4
    assert ids_by_folder(tmp_path / "out") == {"d": Counter(rewritten + kept)}
    (data / "d" / "a.parquet").unlink()
    assert passes.score(lake["detector"], str(data), out, config, resume=True).rows == 1
    assert ids_by_folder(tmp_path / "out") == {"d": Counter(kept)}


def test_a_new_detector_scores_every_partition_again_on_resume(lake, tmp_path):
    data, out, config = tmp_path / "lake", str(tmp_path / "out"), passes.PipelineConfig()
    write_shard(data / "d" / "a.parquet", ["a0", "a1"])
    passes.score(lake["detector"], str(data), out, config, resume=True)
    other = DetectorArtifact.load(lake["detector"])
    other.settings = type(other.settings)(**{**other.settings.__dict__, "false_positive_rate": 0.1})
    other.save(str(tmp_path / "other-detector"))
    assert passes.score(str(tmp_path / "other-detector"), str(data), out, config, resume=True).rows == 2


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_an_output_overlapping_the_input_is_refused_before_any_work(lake, tmp_path, where):
    data = tmp_path / "lake"
    shard = data / "j" / "part.parquet"
    write_shard(shard, ["r0", "r1"])
    before = shard.read_bytes()
    out = {"equal": data / "j", "inside": data / "j" / "scores", "containing": tmp_path}[where]
    with pytest.raises(ValueError, match="overlaps the input"):
        passes.score(lake["detector"], str(data / "j"), str(out), passes.PipelineConfig())
    assert shard.read_bytes() == before and sorted(p.name for p in (data / "j").iterdir()) == ["part.parquet"]


def test_a_file_no_version_lists_is_never_read(lake, tmp_path):
    data, out = tmp_path / "lake", tmp_path / "out"
    ids = write_shard(data / "d" / "a.parquet", ["a0", "a1", "a2"])
    passes.score(lake["detector"], str(data), str(out), passes.PipelineConfig())
    user_file = out / "partition=d" / "notes.parquet"
    pq.write_table(pa.table({"id": ["mine"]}), user_file)
    passes.score(lake["detector"], str(data), str(out), passes.PipelineConfig())
    assert user_file.exists() and ids_by_folder(out) == {"d": Counter(ids)}


def test_a_run_killed_mid_pass_leaves_whole_versions_and_the_next_run_scores_only_the_rest(lake, tmp_path, monkeypatch):
    """The driver dies after committing one partition, with the next one's files written: readers get the
    new version of the first and the previous version of the second, whole; the files written for it are
    in no version; the next `--resume` scores only the second, and every row is there once."""
    data, out = tmp_path / "lake", tmp_path / "out"
    first = {folder: write_shard(data / folder / "a.parquet", [f"{folder}-{i}" for i in range(3)]) for folder in "de"}
    passes.score(lake["detector"], str(data), str(out), passes.PipelineConfig())
    version = delta.open_table(str(out), {}).version()
    new = {folder: write_shard(data / folder / "b.parquet", [f"{folder}-new"]) for folder in "de"}
    commit = ScoreTable.commit

    def dies_before_committing_e(self, versions, run):
        kept = [version for version in versions if version.folder != "e"]
        said = commit(self, kept, run) if kept else {}
        if len(kept) < len(versions):
            raise SystemExit("killed")
        return said

    monkeypatch.setattr(ScoreTable, "commit", dies_before_committing_e)
    with pytest.raises(SystemExit):
        passes.score(lake["detector"], str(data), str(out), passes.PipelineConfig(), resume=True)
    monkeypatch.undo()
    assert delta.open_table(str(out), {}).version() == version + 1
    assert ids_by_folder(out) == {"d": Counter(first["d"] + new["d"]), "e": Counter(first["e"])}
    files_of_e = set((out / "partition=e").glob("*.parquet"))
    assert len(files_of_e) == 2, "the new version's file was written, beside the committed one"
    resumed = passes.score(lake["detector"], str(data), str(out), passes.PipelineConfig(), resume=True)
    assert [p.folder for p in resumed.skipped] == ["d"] and resumed.rows == 4
    assert ids_by_folder(out) == {folder: Counter(first[folder] + new[folder]) for folder in "de"}


def test_partitions_are_selected_by_glob(lake, tmp_path):
    data = tmp_path / "lake"
    for day in ("2026-11-25", "2026-11-26", "2026-12-01"):
        write_shard(data / f"date={day}" / "a.parquet", [f"{day}-{i}" for i in range(2)])
    write_shard(data / "date=2026-11-26" / "hour=03" / "b.parquet", ["late-0"])
    summary = passes.score(
        lake["detector"], str(data), str(tmp_path / "out"), passes.PipelineConfig(), partitions=["date=2026-11-2*"]
    )
    assert [p.folder for p in summary.partitions] == [
        "date=2026-11-25",
        "date=2026-11-26",
        "date=2026-11-26/hour=03",
    ]
    with pytest.raises(FileNotFoundError, match="matching"):
        passes.score(lake["detector"], str(data), str(tmp_path / "o2"), passes.PipelineConfig(), partitions=["x"])


def test_a_partition_with_too_many_error_rows_is_not_committed(lake, tmp_path):
    data = tmp_path / "lake"
    write_shard(data / "good" / "a.parquet", ["g0", "g1"])
    pq.write_table(pa.table({"id": ["b0", "b1", "b2"], "image": [b"junk", b"junk", PNGS[0]]}), _mkdir(data / "bad"))
    with pytest.raises(passes.ScoringFailed, match=r"bad.*2 errors.*above the max error fraction 0\.5") as failure:
        passes.score(lake["detector"], str(data), str(tmp_path / "out"), passes.PipelineConfig())
    assert [p.folder for p in failure.value.summary.failed] == ["bad"]
    assert set(ids_by_folder(tmp_path / "out")) == {"good"}
    with pytest.raises(ValueError, match=r"above the max error fraction 0\.5"):
        passes.fit(lake["model"], str(data / "bad"), passes.PipelineConfig())


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder / "part.parquet"


def test_an_unreadable_shard_is_named_and_every_other_shard_is_still_scored(lake, tmp_path):
    data = tmp_path / "lake"
    good = write_shard(data / "date=1" / "a.parquet", ["a0", "a1"])
    (data / "date=1" / "x.parquet").write_bytes(b"garbage, not Parquet")
    other = write_shard(data / "date=2" / "b.parquet", ["b0"])
    (data / "date=3").mkdir()
    (data / "date=3" / "y.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(passes.ScoringFailed) as failure:
        passes.score(lake["detector"], str(data), str(tmp_path / "out"), passes.PipelineConfig(), resume=True)
    assert "x.parquet" in str(failure.value) and "y.parquet" in str(failure.value)
    assert "not a readable Parquet file" in str(failure.value)
    assert ids_by_folder(tmp_path / "out") == {"date=1": Counter(good), "date=2": Counter(other)}
    assert [p.status for p in failure.value.summary.partitions] == ["committed", "committed", "failed"]
    (data / "date=1" / "x.parquet").unlink()  # the lineage covers only the readable shard: nothing to redo
    (data / "date=3" / "y.parquet").unlink()
    again = passes.score(lake["detector"], str(data), str(tmp_path / "out"), passes.PipelineConfig(), resume=True)
    assert [p.status for p in again.partitions] == ["skipped", "skipped"]


def test_duplicate_ids_are_each_scored_and_counted_in_the_summary(lake, tmp_path):
    data = tmp_path / "lake"
    ids = write_shard(data / "date=1" / "a.parquet", ["d", "d", "e"]) + write_shard(
        data / "date=1" / "b.parquet", ["e"]
    )
    summary = passes.score(lake["detector"], str(data), str(tmp_path / "out"), passes.PipelineConfig())
    assert ids_by_folder(tmp_path / "out") == {"date=1": Counter(ids)}
    assert summary.partitions[0].duplicate_ids == 2 and "2 rows repeat an id (each scored)" in str(summary)


def test_a_fit_with_an_unreadable_shard_names_it_before_any_work(lake, tmp_path):
    shutil.copytree(lake["fit"], tmp_path / "fit")
    (tmp_path / "fit" / "broken.parquet").write_bytes(b"not Parquet")
    with pytest.raises(ValueError, match=r"1 shards cannot be read.*broken\.parquet: not a readable Parquet file"):
        passes.fit(lake["model"], str(tmp_path / "fit"), passes.PipelineConfig())


def test_rows_out_that_differ_from_rows_in_fail_and_keep_the_previous_version(lake, tmp_path):
    """A partition whose written rows fall short of its input is not committed (the committer alone)."""
    data, out = tmp_path / "lake", tmp_path / "out"
    write_shard(data / "d" / "a.parquet", ["a0", "a1", "a2"])
    passes.score(lake["detector"], str(data), str(out), passes.PipelineConfig())
    table = ScoreTable(str(out))
    version = delta.open_table(table.uri, {}).version()
    lineage = Lineage(DetectorArtifact.load(lake["detector"]).detector_id, [], False)
    committer = score_pass.Committer(table, max_error_fraction=0.5)
    committer.expect(0, "d", lineage, table.committed()["d"], rows_in=3, unreadable={})
    short = read_scores(str(out)).select(schema.score_schema().names).slice(0, 2)
    short = short.append_column("partition", pa.array([0, 0], pa.int32()))
    short = short.append_column("memory_splits", pa.array([0, 0], pa.int32()))
    with committer:
        committer.add(score_pass.write_files(short, table, ["d"], {0: lineage.lineage_id}))
    (result,) = committer.results
    assert result.status == "failed" and "2 rows scored from 3 rows in" in result.reason
    assert delta.open_table(table.uri, {}).version() == version
    assert ids_by_folder(out)["d"] == Counter(["a0", "a1", "a2"])


def test_the_actor_pool_may_hold_every_cpu(lake, tmp_path):
    """--cpus-per-actor 2 on the 2-CPU test cluster: reads and writes reserve no CPU, so nothing starves."""
    data = tmp_path / "lake"
    ids = write_shard(data / "d" / "a.parquet", [f"r{i}" for i in range(5)])
    config = passes.PipelineConfig(cpus_per_actor=2)
    assert passes.score(lake["detector"], str(data), str(tmp_path / "out"), config).rows == len(ids)


def test_the_detector_id_is_computed_once_per_detector(lake, monkeypatch):
    detector = DetectorArtifact.load(lake["detector"])
    calls = []
    serialize = DetectorArtifact._serialize
    monkeypatch.setattr(DetectorArtifact, "_serialize", lambda self: calls.append(1) or serialize(self))
    assert len({detector.detector_id for _ in range(5)}) == 1 and len(calls) == 1


# ---- the property: any layout, any change, every folder's ids exactly once --------------------------

NAMES = st.sampled_from(["date=1", "date=2", "hour=03", "raw", "cam-1", "x=a b"])
FOLDERS = st.lists(NAMES, min_size=0, max_size=3).map("/".join)
LAYOUT = st.dictionaries(
    FOLDERS,
    st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=3),  # (rows, has an id column)
    min_size=1,
    max_size=4,
)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=LAYOUT, empty=st.lists(FOLDERS, max_size=2), late=FOLDERS, remove=st.integers(0, 100))
def test_every_layout_keeps_each_folders_ids_exactly_once(lake, tmp_path_factory, layout, empty, late, remove):
    root = tmp_path_factory.mktemp("layout")
    lake_dir, out, config = root / "lake", str(root / "out"), passes.PipelineConfig(batch_size=3)
    expected: dict[str, list[str]] = {}
    for folder, shards in layout.items():
        for index, (rows, with_ids) in enumerate(shards):
            path = lake_dir / folder / f"s{index}.parquet"
            expected.setdefault(folder, []).extend(
                write_shard(path, [f"{folder}/s{index}/{i}" for i in range(rows)], with_ids)
            )
    for folder in empty:
        (lake_dir / folder / "nothing-here").mkdir(parents=True, exist_ok=True)
    passes.score(lake["detector"], str(lake_dir), out, config)
    assert _committed(root / "out", expected) == {f: Counter(ids) for f, ids in expected.items()}

    # a late shard lands (anywhere), and a shard is removed
    expected.setdefault(late, []).extend(write_shard(lake_dir / late / "late.parquet", [f"{late}/late/0"]))
    shards = sorted(lake_dir.rglob("*.parquet"))
    victim = shards[remove % len(shards)]
    folder = victim.parent.relative_to(lake_dir).as_posix()
    folder = "" if folder == "." else folder
    gone = set(write_shard_ids(victim))
    victim.unlink()
    expected[folder] = [i for i in expected[folder] if i not in gone]
    expected = {f: ids for f, ids in expected.items() if ids}
    passes.score(lake["detector"], str(lake_dir), out, config, resume=True)
    assert _committed(root / "out", expected) == {f: Counter(ids) for f, ids in expected.items()}
    shutil.rmtree(root)


def write_shard_ids(path: Path) -> list[str]:
    table = pq.read_table(path)
    if "id" in table.column_names:
        return table.column("id").to_pylist()
    return [f"{path}#{row}" for row in range(table.num_rows)]


def _committed(out: Path, expected: dict[str, list[str]]) -> dict[str, Counter]:
    """The committed ids of every folder that still has input (a folder whose shards all went keeps its output)."""
    return {folder: ids for folder, ids in ids_by_folder(out).items() if folder in expected}


def test_partition_names_cannot_write_outside_the_output(lake, tmp_path):
    data, out = tmp_path / "lake", tmp_path / "out"
    ids = {
        name: write_shard(data / name / "a.parquet", [f"{name}-{i}" for i in range(2)])
        for name in ("date=..", "date=%2E%2E")
    }
    passes.score(lake["detector"], str(data), str(out), passes.PipelineConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lake", "out"]  # nothing written beside the output
    assert ids_by_folder(out) == {name: Counter(found) for name, found in ids.items()}
    assert all(path.resolve().is_relative_to(out.resolve()) for path in out.rglob("*"))
