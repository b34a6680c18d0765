"""Metrics sinks and the run directory."""

from signalrl.logging.run import RunDir, read_metrics

__all__ = ["RunDir", "read_metrics"]
