"""The live doctor and report.html for `TrainerBase` (a mixin): see docs/architecture.md."""

from __future__ import annotations

from typing import Any


class DoctorMixin:
    """Consulting the live doctor at each logged step, and writing report.html."""

    recipe: Any
    dist: Any
    console: Any
    run: Any
    step: int
    resume_from: Any

    def consult_doctor(self, metrics: dict[str, Any]) -> bool:
        """Run the doctor's rules on the logged rows; print each new finding once. True when
        one has a `doctor.stop_on` severity (the run then stops cleanly)."""
        if self.doctor is None:
            return False
        stop = False
        for f in self.doctor.update([{"step": self.step, **metrics}]):
            self.run.log_finding(f.to_dict())  # to the metric sinks (wandb, trackio, ...)
            color = {"critical": "red", "warning": "yellow"}.get(f.severity, "cyan")
            self.console.print(
                f"[{color}]doctor: {f.id} ({f.severity}) at step {f.step}:[/{color}] "
                f"{f.evidence} -> {f.suggestion}",
                highlight=False,
            )
            stop = stop or f.severity in self.recipe.doctor.stop_on
        if stop:
            self.console.print(f"[red]doctor: stopping at step {self.step} (doctor.stop_on)")
        return stop

    def make_doctor(self) -> Any:
        """The live doctor (`signalrl.diagnostics.LiveDoctor`) with the built-in rules and
        `doctor.rules`, or None when `doctor.enabled` is false."""
        if not self.recipe.doctor.enabled or not self.dist.is_main:
            return None
        from signalrl.diagnostics.doctor import LiveDoctor
        from signalrl.diagnostics.rules import BUILTIN_RULES, load_rules, merge_rules

        rules = BUILTIN_RULES
        if self.recipe.doctor.rules:
            rules = merge_rules(BUILTIN_RULES, load_rules(self.recipe.doctor.rules))
        doctor = LiveDoctor(rules, self.recipe.model_dump(mode="json"))
        if self.resume_from is not None:  # the logged steps up to the checkpoint
            from signalrl.logging.run import read_metrics

            doctor.update(read_metrics(self.run.path))  # found before: not printed again
        return doctor

    def findings(self) -> list[dict[str, Any]]:
        """The live doctor's findings, each with the metrics its rule reads (for the report's
        markers)."""
        doctor = getattr(self, "doctor", None)
        if doctor is None:
            return []
        needs = {r.id: list(r.needs or r.needs_any) for r in doctor.rules}
        return [{**f.to_dict(), "metrics": needs.get(f.id, [])} for f in doctor.findings]

    def write_report(self) -> None:
        """`report.html` in the run directory (`signalrl.report`); a failure only warns: the
        run itself is complete."""
        if not self.dist.is_main:
            return
        from signalrl.report.html import write_report

        try:
            findings = {str(self.run.path): self.findings()}
            write_report([self.run.path], self.run.path / "report.html", findings)
        except Exception as e:  # noqa: BLE001 - the report must never fail a finished run
            self.console.print(f"[yellow]warning:[/yellow] report.html not written: {e}")
