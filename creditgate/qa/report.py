"""The report of a ``creditgate qa`` run: a section's outcome (``Section``), the JSON report
with secrets redacted, and its text summary for people."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class Section:
    """One section's outcome: its checks (name, ok, detail) and notes."""

    name: str
    status: str = "pass"
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        """Record one assertion; a failed one fails the section."""
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        if not ok:
            self.status = "fail"
        return bool(ok)

    def skip(self, note: str) -> None:
        """The section could not run here (not a failure); ``note`` says why."""
        if self.status == "pass":
            self.status = "skip"
        self.notes.append(note)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "status": self.status, "checks": self.checks}
        if self.notes:
            doc["notes"] = self.notes
        if self.samples:
            doc["samples"] = self.samples
        return doc


def redact(doc: dict[str, Any], secrets_: list[str]) -> dict[str, Any]:
    text = orjson.dumps(doc).decode()
    for secret in secrets_:
        if secret:
            text = text.replace(secret, secret[:12] + "...redacted")
    redacted: dict[str, Any] = orjson.loads(text)
    return redacted


def summary_text(report: dict[str, Any]) -> str:
    """The report for people: one line per section, the failed checks under it, notes and
    samples."""
    lines = [
        f"creditgate qa {report['mode']} run {report['runId']} (rounding {report['roundingMode']}, "
        f"rate model {report['rateModel']}, accounts {report['accounts']})",
        "",
    ]
    for section in report["sections"]:
        passed = sum(1 for c in section["checks"] if c["ok"])
        lines.append(
            f"{section['status'].upper():5} {section['name']} "
            f"({passed}/{len(section['checks'])} checks)"
        )
        for check in section["checks"]:
            if not check["ok"]:
                detail = orjson.dumps(check["detail"]).decode()
                lines.append(f"      FAILED {check['name']}: {detail[:400]}")
        lines.extend(f"      note: {note}" for note in section.get("notes", []))
        for name, sample in section.get("samples", {}).items():
            lines.append(f"      {name}: {orjson.dumps(sample).decode()}")
    lines.append("")
    lines.append("RESULT: " + ("PASS" if report["ok"] else "FAIL: " + ", ".join(report["failed"])))
    return "\n".join(lines) + "\n"
