"""Run diagnostics: `signalrl doctor` names what is going wrong in a run from its logs
(`diagnose`, `LiveDoctor`), with the evidence and the recipe knob to turn (`rules`)."""

from signalrl.diagnostics.doctor import DoctorError, LiveDoctor, Report, diagnose
from signalrl.diagnostics.rules import BUILTIN_RULES, Finding, Hit, Rule, RunSeries

__all__ = [
    "BUILTIN_RULES",
    "DoctorError",
    "Finding",
    "Hit",
    "LiveDoctor",
    "Report",
    "Rule",
    "RunSeries",
    "diagnose",
]
