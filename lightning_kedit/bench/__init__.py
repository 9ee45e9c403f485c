"""The benchmark harness behind ``kedit bench``: success by number of edits.

- :mod:`.harness`: :func:`run_bench`, every (method, ``N``) cell of a run, resumable.
- :mod:`.cells`: the methods and counts, what the cells share, the batch cells.
- :mod:`.sequential`: the sequential cells, their saved state and its resumption.
- :mod:`.report`: ``results.json`` (:class:`BenchResults`), the table and the plot.
- :mod:`.resource_meter`: wall and CPU seconds and peak memory of a cell (:class:`ResourceMeter`).
"""

from lightning_kedit.bench.cells import (
    BENCH_METHODS,
    UNEDITED,
    BenchMethod,
    available_methods,
    parse_counts,
    parse_methods,
)
from lightning_kedit.bench.harness import run_bench
from lightning_kedit.bench.report import BenchError, BenchResults
from lightning_kedit.bench.resource_meter import ResourceMeter
from lightning_kedit.bench.sequential import read_sequential_state

__all__ = [
    "BENCH_METHODS",
    "UNEDITED",
    "BenchError",
    "BenchMethod",
    "BenchResults",
    "ResourceMeter",
    "available_methods",
    "parse_counts",
    "parse_methods",
    "read_sequential_state",
    "run_bench",
]
