"""Fixtures for worker processes: a Drupal SQLite copy, worker settings, `sfrelay worker` runs."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from app.config import Settings
from app.drupal.engine import nocase_utf8
from tests.servers import SHARED, RedisServer
from workers.main import Worker

DRUPAL10 = SHARED / "drupal" / "sites" / "drupal10-standard.sqlite"
PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def drupal_db(tmp_path: Path) -> Path:
    """A private copy of a real Drupal 10 site's database (the original is never written)."""
    copy = tmp_path / "drupal.sqlite"
    shutil.copyfile(DRUPAL10, copy)
    return copy


@pytest.fixture
def worker_settings(settings: Settings, drupal_db: Path) -> Settings:
    """Settings for a worker writing `drupal_db`: short timeouts, no backoff."""
    return Settings(
        _env_file=None,
        env="production",
        redis_url=settings.redis_url,
        org_ids=settings.org_ids,
        allowed_networks=settings.allowed_networks,
        database_url=f"sqlite:///{drupal_db}",
        job_timeout_seconds=5,
        retry_backoff_seconds=0,
        max_tries=3,
        worker_max_rss_mb=100_000,
    )


async def run_worker(settings: Settings, **overrides: Any) -> Worker:
    """Drain the queue with a real arq Worker in this process (burst mode)."""
    options = {"burst": True, "handle_signals": False, "poll_delay": 0.01, **overrides}
    worker = Worker(settings, **options)
    try:
        await worker.async_run()
    finally:
        with warnings.catch_warnings():
            # arq 0.28 closes its pool with redis-py 5's deprecated close(): not ours to fix.
            warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
            await worker.close()
    return worker


def settings_env(settings: Settings, **extra: object) -> dict[str, str]:
    """The environment that gives a subprocess exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFRELAY_")}
    env.update(
        SFRELAY_ENV=settings.env,
        SFRELAY_REDIS_URL=settings.redis_url,
        SFRELAY_QUEUE_NAME=settings.queue_name,
        SFRELAY_DATABASE_URL=settings.database_url,
        SFRELAY_JOB_TIMEOUT_SECONDS=str(settings.job_timeout_seconds),
        SFRELAY_RETRY_BACKOFF_SECONDS=str(settings.retry_backoff_seconds),
        SFRELAY_MAX_TRIES=str(settings.max_tries),
        SFRELAY_WORKER_MAX_RSS_MB=str(settings.worker_max_rss_mb),
        PYTHONUNBUFFERED="1",
    )
    if settings.allowed_networks:
        env["SFRELAY_ALLOWED_NETWORKS"] = ",".join(map(str, settings.allowed_networks))
    if settings.worker_metrics_port is not None:
        env["SFRELAY_WORKER_METRICS_PORT"] = str(settings.worker_metrics_port)
    env["SFRELAY_LOG_FORMAT"] = settings.log_format
    env.update({f"SFRELAY_{k.upper()}": str(v) for k, v in extra.items()})
    return env


class WorkerProcess:
    """`sfrelay worker` as a real subprocess, its output kept in a log file."""

    def __init__(self, settings: Settings, directory: Path, *args: str) -> None:
        self.settings = settings
        self.log = directory / f"worker-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            # cwd: a folder without a .env, so the environment alone sets everything.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker", *args],
                cwd=directory,
                env={**settings_env(settings), "PYTHONPATH": str(PROJECT)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, client: redis.Redis, timeout: float = 20) -> None:
        """Wait for the health-check key: written once the Syncer is open and polling began."""
        key = self.settings.queue_name + ":health-check"
        deadline = time.monotonic() + timeout
        while not client.exists(key):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{self.output()}")
            time.sleep(0.02)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the worker did not exit:\n{self.output()}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def worker_process(tmp_path: Path, redis_server: RedisServer) -> Iterator[type[WorkerProcess]]:
    """Start workers with `worker_process(settings, tmp_path, *args)`; all killed at the end."""
    started: list[WorkerProcess] = []

    class Tracked(WorkerProcess):
        def __init__(self, settings: Settings, directory: Path, *args: str) -> None:
            super().__init__(settings, directory, *args)
            started.append(self)

    yield Tracked
    for worker in started:
        worker.stop()


def drupal_users(path: Path) -> list[tuple[Any, ...]]:
    """(uid, name, mail, status, first name, last name, Salesforce Id) of every user but 0, 1."""
    with sqlite3.connect(path) as db:
        db.create_collation("NOCASE_UTF8", nocase_utf8)
        rows = db.execute(
            """
            SELECT u.uid, d.name, d.mail, d.status, f.field_first_name_value,
                   l.field_last_name_value, s.field_salesforce_id_value
            FROM users u
            JOIN users_field_data d ON d.uid = u.uid AND d.default_langcode = 1
            LEFT JOIN user__field_first_name f ON f.entity_id = u.uid AND f.deleted = 0
            LEFT JOIN user__field_last_name l ON l.entity_id = u.uid AND l.deleted = 0
            LEFT JOIN user__field_salesforce_id s ON s.entity_id = u.uid AND s.deleted = 0
            WHERE u.uid > 1
            ORDER BY u.uid
            """
        ).fetchall()
    db.close()
    return rows


def assert_drupal_can_load(path: Path) -> None:
    """Every user written by sfrelay has the rows Drupal 10 needs to load it (shared README)."""
    with sqlite3.connect(path) as db:
        db.create_collation("NOCASE_UTF8", nocase_utf8)
        users = db.execute(
            "SELECT u.uid, u.uuid, u.langcode, d.langcode, d.default_langcode, d.init, d.mail "
            "FROM users u JOIN users_field_data d ON d.uid = u.uid WHERE u.uid > 1"
        ).fetchall()
        fields = db.execute(
            "SELECT bundle, deleted, entity_id, revision_id, langcode, delta "
            "FROM user__field_salesforce_id WHERE entity_id > 1"
        ).fetchall()
    db.close()
    assert len({uuid.UUID(u[1]) for u in users}) == len(users)
    assert {u[2:5] for u in users} <= {("en", "en", 1)}
    assert all(init and mail for *_, init, mail in users)  # init: the mail at creation
    assert sorted((f[2], f[0], f[1], f[3], f[4], f[5]) for f in fields) == sorted(
        (u[0], "user", 0, u[0], "en", 0) for u in users
    )


def sigkill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as a crash: no handler runs, nothing is flushed."""
    process.send_signal(signal.SIGKILL)
    assert process.wait(10) == -signal.SIGKILL


@contextmanager
def reaped(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """The process, killed and waited for at the end of the block whatever happened in it."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
