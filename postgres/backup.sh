#!/bin/sh
# Base backups of PostgreSQL with pg_basebackup, and their retention (docs/backups.md).
#
#   backup.sh once    take one base backup, then prune
#   backup.sh daily   the compose `backup` service: once now, then every BACKUP_INTERVAL_S
#
# Connection from libpq's variables (PGHOST, PGPORT, PGUSER, PGPASSWORD). Each backup is a
# directory BACKUP_DIR/base-<UTC time>/ holding base.tar.gz, pg_wal.tar.gz (the WAL the
# copy needs to be consistent: --wal-method=stream), backup_manifest and start_wal (its
# first WAL segment), written under a .partial name and renamed once complete. Pruning removes the base backups older than BACKUP_RETENTION_DAYS
# (the newest one always stays) and, with WAL_ARCHIVE_DIR set, the archived WAL older than
# the oldest backup kept (pg_archivecleanup): any time since that backup stays restorable.
set -eu

BACKUP_DIR=${BACKUP_DIR:-/backups}
BACKUP_RETENTION_DAYS=${BACKUP_RETENTION_DAYS:-14}
BACKUP_INTERVAL_S=${BACKUP_INTERVAL_S:-86400}
WAL_ARCHIVE_DIR=${WAL_ARCHIVE_DIR:-}

log() { echo "backup: $(date -u +%Y-%m-%dT%H:%M:%SZ) $*"; }

take_backup() {
    name="base-$(date -u +%Y%m%dT%H%M%SZ)"
    partial="$BACKUP_DIR/$name.partial"
    rm -rf "$partial"
    mkdir -p "$partial"
    pg_basebackup --pgdata="$partial" --format=tar --gzip --wal-method=stream \
        --checkpoint=fast --label="$name" --no-password
    # backup_label names the first WAL segment this backup needs: what pg_archivecleanup
    # keeps from.
    start_wal=$(tar -xzOf "$partial/base.tar.gz" backup_label | sed -n 's/^START WAL LOCATION: .* (file \(.*\))$/\1/p')
    echo "$start_wal" > "$partial/start_wal"
    mv "$partial" "$BACKUP_DIR/$name"
    log "took $BACKUP_DIR/$name (starts at WAL $start_wal)"
}

prune() {
    newest=$(ls -1d "$BACKUP_DIR"/base-*Z 2>/dev/null | tail -n 1)
    find "$BACKUP_DIR" -mindepth 1 -maxdepth 1 -name 'base-*Z' -type d \
        -mtime +"$BACKUP_RETENTION_DAYS" ! -path "$newest" -print -exec rm -rf {} +
    oldest=$(ls -1d "$BACKUP_DIR"/base-*Z 2>/dev/null | head -n 1)
    if [ -n "$WAL_ARCHIVE_DIR" ] && [ -n "$oldest" ] && [ -s "$oldest/start_wal" ]; then
        pg_archivecleanup "$WAL_ARCHIVE_DIR" "$(cat "$oldest/start_wal")"
        log "archived WAL before $(cat "$oldest/start_wal") removed (oldest backup: $oldest)"
    fi
}

case "${1:-once}" in
    once)
        take_backup
        prune
        ;;
    daily)
        while true; do
            take_backup || log "FAILED; next try in ${BACKUP_INTERVAL_S} s"
            prune || log "pruning FAILED"
            sleep "$BACKUP_INTERVAL_S"
        done
        ;;
    *)
        echo "usage: $0 once|daily" >&2
        exit 2
        ;;
esac
