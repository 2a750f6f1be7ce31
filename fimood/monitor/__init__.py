"""Nightly dataset-shift monitoring, the product that runs every night (`fimood monitor`, jobs/monitor.py).

`run_monitor(MonitorConfig(...))` scores what is new, tests each partition against the detector's
reference under a false-alarm budget, keeps the history (`history`, its declared schema) and writes
the report (`report`); `MonitorResult` is what it found.
"""

from fimood.monitor.result import EXIT_COULD_NOT_RUN, EXIT_OK, EXIT_SHIFT, MonitorResult, PartitionVerdict
from fimood.monitor.runner import MonitorConfig, run_monitor

__all__ = [
    "EXIT_COULD_NOT_RUN",
    "EXIT_OK",
    "EXIT_SHIFT",
    "MonitorConfig",
    "MonitorResult",
    "PartitionVerdict",
    "run_monitor",
]
