"""The test kit is for developers: a runtime install of Tally neither ships nor needs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
KIT = "stripe_testkit"

# Left out of the copy the wheel is built from: local state, caches and build output,
# none of which setuptools would package (a stale build/ or egg-info could only hide a
# change to the package list).
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", ".tally", "build", "dist", "*.egg-info", "__pycache__",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "results",
)


@pytest.fixture(scope="module")
def runtime_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` would install, built from a copy of the project (pip
    builds in the source folder, and the real one is shared with other runs)."""
    root = tmp_path_factory.mktemp("runtime-wheel")
    source, out = root / "source", root / "wheels"
    shutil.copytree(REPO_ROOT, source, ignore=_NOT_SOURCES)
    assert (source / "testkit" / "src" / KIT).is_dir()  # present beside it, yet not shipped
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--disable-pip-version-check", "--wheel-dir", str(out), str(source)],
        check=True, capture_output=True, timeout=240,
    )
    (wheel,) = out.glob("tally-*.whl")
    return wheel


@pytest.mark.timeout(300)
def test_runtime_wheel_ships_the_product_but_not_the_test_kit(runtime_wheel: Path) -> None:
    names = zipfile.ZipFile(runtime_wheel).namelist()
    top_level = {name.split("/")[0] for name in names if "/" in name}

    assert {"billing_jobs", "devtools", "tally"} <= top_level
    assert not [name for name in names if KIT in name or "stripe_double" in name]


@pytest.mark.timeout(300)
def test_runtime_install_cannot_import_the_test_kit(runtime_wheel: Path,
                                                    tmp_path: Path) -> None:
    # A pure-Python wheel installs by unpacking it; -S keeps the interpreter off this
    # environment's site-packages, where the developer install put the kit.
    site = tmp_path / "site"
    zipfile.ZipFile(runtime_wheel).extractall(site)
    probe = ("import importlib.util as u; "
             f"print(u.find_spec('billing_jobs') is not None, u.find_spec('{KIT}') is None)")
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", "")}, cwd=tmp_path,
    )

    assert result.stdout.split() == ["True", "True"]


def test_demo_without_the_test_kit_fails_in_one_line(tmp_path: Path) -> None:
    # As on a runtime install: the kit cannot be found (a None in sys.modules hides it).
    run_demo = ("import sys; sys.modules['stripe_testkit'] = None; "
                "from tally.cli import main; sys.exit(main(['demo']))")
    env = {k: v for k, v in os.environ.items() if k != "STRIPE_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-c", run_demo], capture_output=True, text=True, timeout=60,
        env={**env, "TALLY_HOME": str(tmp_path)}, cwd=tmp_path,
    )

    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tally: error: tally demo needs the developer install (make install): "
        "the Stripe double is in the test kit"
    )
