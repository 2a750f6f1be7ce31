"""`python table_reader.py ENGINE URI OPTIONS_JSON STOP_FILE`: read a score table over and over with a user's
own Delta reader (duckdb, polars or pyarrow) until STOP_FILE exists; print one JSON line per read.

A line is {"partitions": {partition: [rows, distinct ids, [version tags]]}} or {"error": "..."}; an id's
version tag is what precedes its first '-' (the writer names its rows so).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def read_duckdb(uri: str, options: dict) -> list[tuple[str, str]]:
    import duckdb
    import duckdb_ext

    connection = duckdb.connect(config={"extension_directory": f"{duckdb_ext.__path__[0]}/extensions"})
    connection.sql("LOAD delta")
    if uri.startswith("s3://"):
        connection.sql("LOAD httpfs")
        endpoint = options["AWS_ENDPOINT_URL"].removeprefix("http://")
        connection.sql(
            f"CREATE SECRET (TYPE s3, KEY_ID '{options['AWS_ACCESS_KEY_ID']}', SECRET "
            f"'{options['AWS_SECRET_ACCESS_KEY']}', REGION '{options['AWS_REGION']}', ENDPOINT '{endpoint}', "
            "URL_STYLE 'path', USE_SSL false)"
        )
    return connection.sql(f"SELECT partition, id FROM delta_scan('{uri}')").fetchall()


def read_polars(uri: str, options: dict) -> list[tuple[str, str]]:
    import polars

    return polars.read_delta(uri, storage_options=options or None).select(["partition", "id"]).rows()


def read_pyarrow(uri: str, options: dict) -> list[tuple[str, str]]:
    from deltalake import DeltaTable

    dataset = DeltaTable(uri, storage_options=options or None).to_pyarrow_dataset()
    table = dataset.to_table(columns=["partition", "id"])
    return list(zip(table.column("partition").to_pylist(), table.column("id").to_pylist(), strict=True))


READERS = {"duckdb": read_duckdb, "polars": read_polars, "pyarrow": read_pyarrow}


def main(engine: str, uri: str, options: dict, stop: Path) -> None:
    while not stop.exists():
        try:
            rows = READERS[engine](uri, options)
        except Exception as error:  # every failed read is reported, not raised: the test counts them
            print(json.dumps({"error": f"{type(error).__name__}: {error}"[:500]}), flush=True)
            continue
        ids = defaultdict(list)
        for partition, row_id in rows:
            ids[partition].append(row_id)
        found = {p: [len(i), len(set(i)), sorted({x.split("-", 1)[0] for x in i})] for p, i in ids.items()}
        print(json.dumps({"partitions": found}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]))
