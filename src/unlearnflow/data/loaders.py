"""``benchmark.name`` → the loader that builds its ``Benchmark``."""

from __future__ import annotations

import importlib

from unlearnflow.config import BenchmarkConfig
from unlearnflow.data.benchmark import Benchmark


def build_benchmark(cfg: BenchmarkConfig) -> Benchmark:
    """Generate (synthetic) or load (tofu, muse, wmdp, custom) the configured benchmark.

    Loader modules are imported on demand: only the chosen one's dependencies (e.g. ``datasets``
    for a hub id) are paid for.
    """
    if cfg.name == "synthetic":
        from unlearnflow.data import synthetic

        return synthetic.benchmark(cfg)
    return importlib.import_module(f"unlearnflow.data.{cfg.name}").load(cfg)
