"""The score table's schema, declared once: the product's main output, one row per input row.

The score pass writes it (its actors build each batch with `score_schema`), the commit counts its
rows and errors, the monitor's summaries and `fimood.read_committed` read it, and a test compares a
written table with it exactly. Every file carries its version in the Parquet schema's metadata.
A committed table read with its folders as Hive partitions adds their keys (`date`, ...) as columns.
"""

from __future__ import annotations

import pyarrow as pa

SCORE_SCHEMA_VERSION = 1
METADATA = {b"fimood.table": b"scores", b"fimood.schema_version": str(SCORE_SCHEMA_VERSION).encode()}

ID = "id"  # the row's id: its id column, else `<shard path>#<row>` (or the image file's path)
OOD_SCORE = "ood_score"  # the detector's score; higher = more OOD; null where `error` is set
P_VALUE = "p_value"  # conformal p-value against the calibration rows
IS_OOD = "is_ood"  # above the detector's calibrated threshold
NLL = "nll"  # the model's negative log-likelihood, in its `nll_unit`
ERROR = "error"  # why the row could not be scored; null when it was
DETECTOR_ID = "detector_id"  # content hash of the detector that scored it
Z_SCORES = "z_scores"  # per kept feature, (f − μ)/σ; only with `fimood score --z-scores` (the monitor)

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
