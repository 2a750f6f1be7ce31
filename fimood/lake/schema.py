"""The score table's schema, declared once: the product's main output, one row per input row.

The score pass's actors build each batch with `score_schema`; the commit adds the partition and
what the rows were scored from, giving `table_schema`, the columns of the Delta table every reader
sees (`fimood.lake.score_table`); a test compares a written table with it exactly. Every staged
file carries the schema's version in its Parquet metadata, every commit in its commit info, and the
table in its description.
"""

from __future__ import annotations

import pyarrow as pa

SCORE_SCHEMA_VERSION = 2  # 2: a Delta table, with `partition`, `fimood_version` and `lineage_id`
METADATA = {b"fimood.table": b"scores", b"fimood.schema_version": str(SCORE_SCHEMA_VERSION).encode()}

ID = "id"  # the row's id: its id column, else `<shard path>#<row>` (or the image file's path)
OOD_SCORE = "ood_score"  # the detector's score; higher = more OOD; null where `error` is set
P_VALUE = "p_value"  # conformal p-value against the calibration rows
IS_OOD = "is_ood"  # above the detector's calibrated threshold
NLL = "nll"  # the model's negative log-likelihood, in its `nll_unit`
ERROR = "error"  # why the row could not be scored; null when it was
DETECTOR_ID = "detector_id"  # content hash of the detector that scored it
Z_SCORES = "z_scores"  # per kept feature, (f − μ)/σ; only with `fimood score --z-scores` (the monitor)
PARTITION = "partition"  # the input folder the row came from, relative to the data URL ('.' for the URL itself)
FIMOOD_VERSION = "fimood_version"  # the fimood that committed the row
LINEAGE_ID = "lineage_id"  # sha256 of what its partition was scored from: `_fimood/lineage/<id>.json` in the table

_FIELDS = [
    pa.field(ID, pa.string()),
    pa.field(OOD_SCORE, pa.float64()),
    pa.field(P_VALUE, pa.float64()),
    pa.field(IS_OOD, pa.bool_()),
    pa.field(NLL, pa.float64()),
    pa.field(ERROR, pa.string()),
    pa.field(DETECTOR_ID, pa.string()),
]


def parquet_list(item: pa.DataType) -> pa.DataType:
    """A list type whose item is named `element`, as Parquet's LIST type names it: a written file reads back
    with exactly the declared schema."""
    return pa.list_(pa.field("element", item))


def score_schema(z_scores: bool = False) -> pa.Schema:
    """The columns of a score table, in order, with their types (and `z_scores` when asked for)."""
    fields = _FIELDS + ([pa.field(Z_SCORES, parquet_list(pa.float64()))] if z_scores else [])
    return pa.schema(fields, metadata=METADATA)


def table_schema() -> pa.Schema:
    """The columns of the committed score table, as every Delta reader sees them (Delta keeps no schema
    metadata). `partition` is its Delta partition column; `z_scores` is null unless the run asked for them."""
    return pa.schema(
        [
            pa.field(PARTITION, pa.string()),
            *score_schema(z_scores=True),
            pa.field(FIMOOD_VERSION, pa.string()),
            pa.field(LINEAGE_ID, pa.string()),
        ]
    )
