"""What the deploy/ checks compare against: the real `tally` commands, settings and metrics.

Every list here is read from the code (the CLI parser, the Settings model, the
prometheus_client registry, the source), so a rename in the code fails the checks instead
of leaving a manifest behind.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shutil
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client import REGISTRY

from runtime.settings import Settings
from tally.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OPERATIONS = ROOT / "docs" / "operations.md"

# Metrics that Tally does not export but the deployment scrapes, and where they come from.
EXTERNAL_METRICS = {
    "up": "Prometheus itself, one series per scrape target",
    "kafka_consumergroup_lag": "kafka-exporter (deploy/docker-compose.yml, deploy/k8s)",
    "kafka_consumergroup_current_offset": "kafka-exporter",
    "kafka_topic_partition_current_offset": "kafka-exporter",
    "kafka_topic_partition_oldest_offset": "kafka-exporter",
}
# Metrics an alert needs that the code does not export yet. Each must still be missing:
# once a package exports one, delete it here.
PENDING_METRICS: dict[str, str] = {}
# Labels Prometheus adds to every scraped series. A metric with a `job` label of its own
# (the billing jobs') has it stored as `exported_job` beside the scrape job's.
TARGET_LABELS = {"job", "instance"}

PACKAGES: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"][
    "packages"]


# --- commands ---------------------------------------------------------------------------


class NotACommand(AssertionError):
    pass


def parse_tally(argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by the real `tally` parser; NotACommand when it would refuse them."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        raise NotACommand(f"`tally {' '.join(argv)}` is not a tally command") from e
    if not hasattr(args, "func"):
        raise NotACommand(f"`tally {' '.join(argv)}` names a group, not a command")
    return args


def listening_port(args: argparse.Namespace) -> int | None:
    """The port a parsed long-running command serves HTTP on (metrics, health)."""
    for name in ("web_port", "port", "metrics_port"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value:
            return value
    return None


def check_python_c(code: str) -> None:
    """A `python -c` command: it compiles, and every name it imports exists."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


# --- settings ---------------------------------------------------------------------------


def _package_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from (ROOT / package).rglob("*.py")


def _environ_reads(tree: ast.AST) -> Iterator[str]:
    """Names in os.environ.get("X"), os.environ["X"], os.getenv("X")."""
    for node in ast.walk(tree):
        target: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and (
                (func.attr == "get" and ast.unparse(func.value) == "os.environ")
                or (func.attr == "getenv" and ast.unparse(func.value) == "os")
            ):
                target = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            target = node.slice
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            yield target.value


@cache
def environment_names() -> frozenset[str]:
    """Every environment variable a Tally process reads: the Settings fields under their
    variable names, and the few variables the code reads directly (secrets kept out of
    the settings object, TALLY_HOME, TALLY_LOGLEVEL)."""
    names = {Settings.env_name(field) for field in Settings.model_fields}
    for path in _package_files():
        names.update(_environ_reads(ast.parse(path.read_text(), str(path))))
    return frozenset(names)


# --- metrics ----------------------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


@cache
def exported_metrics() -> dict[str, frozenset[str]]:
    """Every series name Tally's code registers with prometheus_client, with its labels:
    the modules of Tally's packages that use prometheus_client are imported, then the
    default registry is read."""
    for path in _package_files():
        if "prometheus_client" in path.read_text():
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            importlib.import_module(module.removesuffix(".__init__"))
    labels_of: dict[str, frozenset[str]] = {}
    for collector in list(getattr(REGISTRY, "_collector_to_names", {})):
        labelnames = frozenset(getattr(collector, "_labelnames", ()))
        for family in collector.collect():
            for suffix in _SUFFIXES[family.type]:
                labels_of[family.name + suffix] = labelnames | (
                    {"le"} if suffix == "_bucket" else set())
    return labels_of


def _selectors(node: Any) -> Iterator[promql_parser.VectorSelector]:
    if isinstance(node, promql_parser.VectorSelector):
        yield node
    elif isinstance(node, promql_parser.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from _selectors(node.lhs)
        yield from _selectors(node.rhs)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from _selectors(node.expr)
        if node.param is not None:
            yield from _selectors(node.param)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from _selectors(arg)
    elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr
                    | promql_parser.SubqueryExpr):
        yield from _selectors(node.expr)


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's interval variables replaced by a duration."""
    return re.sub(r"\$__\w+", "5m", expr)


def selected_metrics(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names matched on) of every selector in a PromQL expression."""
    for selector in _selectors(promql_parser.parse(expr)):
        matchers = selector.matchers.matchers
        name = selector.name or next(m.value for m in matchers if m.name == "__name__")
        yield name, {m.name for m in matchers if m.name != "__name__"}


def unknown_metrics(expr: str) -> list[str]:
    """What is wrong with the metrics an expression selects (empty: nothing)."""
    exported = exported_metrics()
    problems = []
    for name, labels in selected_metrics(expr):
        if name in EXTERNAL_METRICS or name in PENDING_METRICS:
            continue
        if name not in exported:
            problems.append(f"{name}: no such metric in the code")
        elif unknown := labels - exported[name] - TARGET_LABELS - (
                {"exported_job"} if "job" in exported[name] else set()):
            problems.append(f"{name}: no label {', '.join(sorted(unknown))}")
    return problems


# --- files and tools --------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def tool(name: str) -> str:
    """The path of a command-line tool `make tools` installs (Debian's prometheus and
    prometheus-alertmanager packages)."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/local/bin") / name)
         if p.exists()), None)
    assert found, f"{name} is not installed: run `make tools` (Debian's prometheus packages)"
    return found


def alert_rules() -> list[dict[str, Any]]:
    rules = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def markdown_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for line in path.read_text().splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors
