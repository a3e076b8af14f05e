"""``make restore-drill`` (devtools/restore_drill.py), run as a real process: base backup under
paid traffic, point-in-time restore into a fresh server, ``creditgate reconcile`` on the copy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_restore_drill_restores_to_the_target_time_and_the_copy_reconciles():
    result = subprocess.run(
        [sys.executable, "-m", "devtools.restore_drill"],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    summary = json.loads(result.stdout)
    assert (result.returncode, summary["ok"]) == (0, True), (summary, result.stderr[-3000:])
    assert summary["failedRequests"] == 0
    assert summary["paidRequests"]["beforeTarget"] > 0
    assert summary["paidRequests"]["afterTarget"] > 0
    # Every ledger entry committed before the target time, and nothing after it: the initial
    # grant plus one deduction per paid request before the target.
    assert summary["ledgerEntriesMissingFromCopy"] == []
    assert summary["ledgerEntriesAfterTargetInCopy"] == []
    restored = summary["rowsRestored"]
    assert restored["ledger_entries"] == summary["ledgerEntriesBeforeTarget"]
    assert restored["usage_events"] == summary["paidRequests"]["beforeTarget"]
    assert restored["ledger_entries"] == restored["usage_events"] + 1
    assert summary["reconcile"]["ok"] is True
    assert set(summary["reconcile"]["mismatchCounts"].values()) == {0}
