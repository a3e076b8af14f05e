"""The Prometheus configuration, rules and their unit tests (prometheus/), checked with promtool
(Debian's `prometheus` package; `make system-deps` installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS / "tests").glob("*.test.yml"))


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make system-deps` installs Debian's prometheus package"
    return subprocess.run(
        [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_rule_files_are_valid() -> None:
    assert RULE_FILES
    result = _promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_configuration_is_valid_and_loads_every_rule_file() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RULE_FILES)} rule files found" in result.stdout


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda path: path.name)
def test_the_rules_pass_their_unit_tests(test_file: Path) -> None:
    result = _promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    """Each alert appears in a promtool test where it fires and in one where it does not."""
    alerts = {
        rule["alert"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    fired: set[str] = set()
    silent: set[str] = set()
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts
    assert alerts - fired == set(), "alerts never seen firing"
    assert alerts - silent == set(), "alerts never seen silent"


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    runbook = (PROMETHEUS.parent / "docs" / "alerts.md").read_text()
    anchors = {
        line.lstrip("#").strip().lower() for line in runbook.splitlines() if line.startswith("## ")
    }
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" not in rule:
                    continue
                name = rule["alert"]
                assert rule["labels"]["severity"] in {"page", "ticket"}, name
                annotations = rule["annotations"]
                assert annotations["summary"] and annotations["description"], name
                assert annotations["runbook_url"] == f"docs/alerts.md#{name.lower()}", name
                assert name.lower() in anchors, f"docs/alerts.md has no section {name}"
