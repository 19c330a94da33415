"""The service's state in SQLite: one row per (study, model) and an attempt log.

A row's status moves pending -> running -> graded | failed. ``running`` rows found at start-up
were interrupted and go back to pending (a restart resumes). A failed study is retried after an
exponential backoff and never blocks the queue. A study is keyed by its fingerprint (its MR
series and their instance counts): the same fingerprint under the same model is never graded
twice; a changed fingerprint queues the study again, remembering the results to supersede.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT NOT NULL,
    model_id TEXT NOT NULL,
    status TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    first_seen REAL NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    graded_fingerprint TEXT NOT NULL DEFAULT '',
    graded_at REAL,
    result TEXT,
    sr_series_uid TEXT,
    sr_sop_uid TEXT,
    sc_series_uid TEXT,
    superseded TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (study_uid, model_id)
);
CREATE TABLE IF NOT EXISTS attempts (
    study_uid TEXT NOT NULL,
    model_id TEXT NOT NULL,
    started REAL NOT NULL,
    seconds REAL NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

STATUSES = ("pending", "running", "graded", "failed")


@dataclass
class StudyRow:
    """One study under one model, as the worklist shows it."""

    study_uid: str
    model_id: str
    status: str
    fingerprint: str
    info: dict
    first_seen: float
    updated: float
    attempts: int
    next_try: float
    reason: str
    graded_fingerprint: str
    graded_at: float | None
    result: dict | None
    sr_series_uid: str | None
    sr_sop_uid: str | None
    sc_series_uid: str | None
    superseded: list


def backoff_s(attempts: int, base_s: float, cap_s: float = 3600.0) -> float:
    """Seconds to wait after the ``attempts``-th failure: base, 2 base, 4 base ... capped."""
    return min(cap_s, base_s * 2 ** max(0, attempts - 1))


class State:
    """Thread-safe access to the state database (the loop writes, the web page reads)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---------------------------------------------------------------- lifecycle

    def resume(self) -> int:
        """Put studies left ``running`` by an interrupted process back in the queue."""
        rows = self._exec("SELECT COUNT(*) FROM studies WHERE status='running'")
        self._exec("UPDATE studies SET status='pending', next_try=0 WHERE status='running'")
        return int(rows[0][0])

    def get_meta(self, key: str, default: str = "") -> str:
        rows = self._exec("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        self._exec("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def observe(self, study_uid: str, model_id: str, fingerprint: str, info: dict) -> str:
        """Record a study seen on the PACS; returns its status afterwards.

        New -> pending. Graded with the same fingerprint -> unchanged (idempotent). Graded or
        failed with another fingerprint -> pending again, attempts reset.
        """
        now = time.time()
        row = self.get(study_uid, model_id)
        if row is None:
            self._exec(
                "INSERT INTO studies(study_uid, model_id, status, fingerprint, info, first_seen,"
                " updated) VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                (study_uid, model_id, fingerprint, json.dumps(info), now, now),
            )
            return "pending"
        if row.fingerprint == fingerprint:
            return row.status
        self._exec(
            "UPDATE studies SET status='pending', fingerprint=?, info=?, attempts=0, next_try=0,"
            " reason='', updated=? WHERE study_uid=? AND model_id=?",
            (fingerprint, json.dumps(info), now, study_uid, model_id),
        )
        return "pending"

    def due(self, model_id: str, now: float | None = None) -> list[StudyRow]:
        """Pending studies and failed ones whose backoff has passed, oldest first."""
        now = time.time() if now is None else now
        rows = self._exec(
            "SELECT * FROM studies WHERE model_id=? AND status IN ('pending','failed') "
            "AND next_try<=? ORDER BY first_seen",
            (model_id, now),
        )
        return [_row(r) for r in rows]

    def start(self, study_uid: str, model_id: str) -> None:
        self._exec(
            "UPDATE studies SET status='running', updated=? WHERE study_uid=? AND model_id=?",
            (time.time(), study_uid, model_id),
        )

    def finish(
        self,
        row: StudyRow,
        result: dict,
        sr_series_uid: str,
        sr_sop_uid: str,
        sc_series_uid: str,
        started: float,
    ) -> None:
        """Mark graded; the previous result series (if any) are listed as superseded."""
        now = time.time()
        superseded = list(row.superseded)
        if row.sr_series_uid:
            superseded.append({"sr": row.sr_series_uid, "sc": row.sc_series_uid})
        self._exec(
            "UPDATE studies SET status='graded', reason='', attempts=attempts+1, graded_at=?,"
            " graded_fingerprint=fingerprint, result=?, sr_series_uid=?, sr_sop_uid=?,"
            " sc_series_uid=?, superseded=?, updated=? WHERE study_uid=? AND model_id=?",
            (now, json.dumps(result), sr_series_uid, sr_sop_uid, sc_series_uid,
             json.dumps(superseded), now, row.study_uid, row.model_id),
        )  # fmt: skip
        self._log(row, started, now, "graded", "")

    def fail(self, row: StudyRow, reason: str, started: float, base_backoff_s: float) -> float:
        """Mark failed with ``reason``; it is retried after the backoff (returned, in seconds)."""
        now = time.time()
        attempts = row.attempts + 1
        wait = backoff_s(attempts, base_backoff_s)
        self._exec(
            "UPDATE studies SET status='failed', reason=?, attempts=?, next_try=?, updated=?"
            " WHERE study_uid=? AND model_id=?",
            (reason, attempts, now + wait, now, row.study_uid, row.model_id),
        )
        self._log(row, started, now, "failed", reason)
        return wait

    def _log(self, row: StudyRow, started: float, now: float, outcome: str, reason: str) -> None:
        self._exec(
            "INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?)",
            (row.study_uid, row.model_id, started, now - started, outcome, reason),
        )

    # ---------------------------------------------------------------- reading

    def get(self, study_uid: str, model_id: str) -> StudyRow | None:
        rows = self._exec(
            "SELECT * FROM studies WHERE study_uid=? AND model_id=?", (study_uid, model_id)
        )
        return _row(rows[0]) if rows else None

    def all(self, model_id: str | None = None) -> list[StudyRow]:
        if model_id is None:
            rows = self._exec("SELECT * FROM studies ORDER BY updated DESC")
        else:
            rows = self._exec(
                "SELECT * FROM studies WHERE model_id=? ORDER BY updated DESC", (model_id,)
            )
        return [_row(r) for r in rows]

    def attempts(self, study_uid: str) -> list[dict]:
        rows = self._exec("SELECT * FROM attempts WHERE study_uid=? ORDER BY started", (study_uid,))
        return [dict(r) for r in rows]


def _row(r: sqlite3.Row) -> StudyRow:
    d = dict(r)
    d["info"] = json.loads(d["info"] or "{}")
    d["result"] = json.loads(d["result"]) if d["result"] else None
    d["superseded"] = json.loads(d["superseded"] or "[]")
    return StudyRow(**d)
