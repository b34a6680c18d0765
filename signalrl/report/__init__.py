"""The run report: one self-contained report.html per run (`signalrl report`)."""

from signalrl.report.html import ReportError, write_report

__all__ = ["ReportError", "write_report"]
