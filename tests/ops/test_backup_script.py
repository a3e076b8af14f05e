"""postgres/backup.sh (the compose ``backup`` service), run against the session's PostgreSQL:
a base backup, then retention of old backups and of the archived WAL they no longer need.
The restore of such a backup is tests/ops/test_restore_drill.py's."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DAY_S = 24 * 3600


def _aged(path: Path, days: float) -> Path:
    path.mkdir(parents=True)
    (path / "start_wal").write_text("000000010000000000000001\n", encoding="utf-8")
    then = time.time() - days * DAY_S
    os.utime(path, (then, then))
    return path


def test_backup_once_takes_a_base_backup_and_prunes_what_retention_drops(pg_server, tmp_path):
    backups = tmp_path / "backups"
    expired = _aged(backups / "base-20200101T000000Z", days=30)
    kept = _aged(backups / "base-20200102T000000Z", days=3)
    archive = tmp_path / "wal-archive"
    archive.mkdir()
    old_segment, new_segment = "000000010000000000000000", "000000010000000000000001"
    (archive / old_segment).write_bytes(b"")
    (archive / new_segment).write_bytes(b"")
    env = {
        "PATH": "/usr/bin:/bin",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg_server.port),
        "PGUSER": "postgres",
        "BACKUP_DIR": str(backups),
        "BACKUP_RETENTION_DAYS": "14",
        "WAL_ARCHIVE_DIR": str(archive),
    }
    result = subprocess.run(
        ["sh", str(REPO_ROOT / "postgres" / "backup.sh"), "once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    taken = [path for path in sorted(backups.iterdir()) if path not in (kept,)]
    assert len(taken) == 1
    (new,) = taken
    assert new.name.startswith("base-") and new.name.endswith("Z")  # renamed from .partial
    assert {path.name for path in new.iterdir()} == {
        "base.tar.gz",
        "pg_wal.tar.gz",
        "backup_manifest",
        "start_wal",
    }
    assert len(new.joinpath("start_wal").read_text(encoding="utf-8").strip()) == 24
    assert not expired.exists()  # older than BACKUP_RETENTION_DAYS
    assert kept.exists()
    # The oldest backup kept starts at segment ...01: the archive keeps it, drops the older.
    assert sorted(path.name for path in archive.iterdir()) == [new_segment]


def test_backup_prune_never_removes_the_newest_backup(pg_server, tmp_path):
    backups = tmp_path / "backups"
    env = {
        "PATH": "/usr/bin:/bin",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg_server.port),
        "PGUSER": "postgres",
        "BACKUP_DIR": str(backups),
        "BACKUP_RETENTION_DAYS": "0",  # everything older than a day goes, the newest stays
    }
    script = str(REPO_ROOT / "postgres" / "backup.sh")
    first = subprocess.run(["sh", script, "once"], env=env, capture_output=True, timeout=100)
    assert first.returncode == 0, first.stderr
    (only,) = backups.iterdir()
    then = time.time() - 3 * DAY_S
    os.utime(only, (then, then))
    time.sleep(1.1)  # the next backup's name (to the second) differs
    second = subprocess.run(["sh", script, "once"], env=env, capture_output=True, timeout=100)
    assert second.returncode == 0, second.stderr
    names = [path.name for path in backups.iterdir()]
    assert len(names) == 1 and names[0] != only.name  # the old one pruned, the new one kept
