"""The `tally` command as a user meets it: one-line errors, the dev stack lifecycle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def tally(*args: str, home: Path, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "tally.cli", *args], capture_output=True, text=True,
        env={**base, "TALLY_HOME": str(home), **(env or {})}, timeout=timeout,
    )


@pytest.mark.parametrize("args", [
    ("worker", "--web-port", "not-a-port"),
    ("plans", "publish", "/no/such/plans.toml"),
    ("no-such-command",),
    ("jobs",),
])
def test_bad_arguments_get_a_one_line_error_not_a_traceback(args: tuple[str, ...],
                                                            tmp_path: Path) -> None:
    result = tally(*args, home=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tally: error")]
    assert len(lines) == 1, result.stderr


def test_invalid_catalog_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "plans.toml"
    bad.write_text('default_plan = "gold"\n[meters.api_calls]\naggregation = "median"\n'
                   '[plans.free]\nname = "Free"\n')
    result = tally("plans", "publish", str(bad), home=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "aggregation" in result.stderr


def test_commands_without_a_stack_say_how_to_get_one(tmp_path: Path) -> None:
    result = tally("db", "migrate", home=tmp_path)
    assert result.returncode == 2
    assert "tally dev up" in result.stderr and "Traceback" not in result.stderr


def test_invalid_settings_are_reported_in_one_line(tmp_path: Path) -> None:
    result = tally("db", "migrate", home=tmp_path, env={"TALLY_PARTITIONS": "many"})
    assert result.returncode == 2 and "partitions" in result.stderr
    assert "Traceback" not in result.stderr


def test_dev_stack_up_status_down(tmp_path: Path) -> None:
    up = tally("dev", "up", home=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        env_file = (tmp_path / "dev.env").read_text()
        assert "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:" in env_file
        assert "DATABASE_URL=postgresql://" in env_file
        status = tally("dev", "status", home=tmp_path)
        assert status.returncode == 0 and status.stdout.count(" up") == 2
        migrate = tally("db", "migrate", home=tmp_path)  # finds the stack via dev.env
        assert migrate.returncode == 0 and "applied" in migrate.stdout
        again = tally("db", "migrate", home=tmp_path)
        assert again.returncode == 0 and "up to date" in again.stdout
    finally:
        down = tally("dev", "down", home=tmp_path)
    assert down.returncode == 0
    assert tally("dev", "status", home=tmp_path).returncode == 1
