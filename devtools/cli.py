"""`tally dev up|down|status` and `tally demo`: the developer's commands."""

from __future__ import annotations

import argparse

from runtime.commands import Subparsers, add_group, positive_int
from runtime.settings import read_env_file, state_dir


def _dev_up(args: argparse.Namespace) -> int:
    from devtools import devstack

    home = state_dir()
    env_file = home / "dev.env"
    recorded = read_env_file(env_file)
    if recorded and all(devstack.is_running(recorded).values()):
        print(f"dev stack already running: kafka {recorded['KAFKA_BOOTSTRAP_SERVERS']}, "
              f"postgres {recorded['DATABASE_URL']}")
        return 0
    stack = devstack.up(home)
    env_file.write_text("".join(f"{k}={v}\n" for k, v in stack.env().items()))
    print(f"kafka     {stack.kafka_bootstrap_servers}\npostgres  {stack.database_url}\n"
          f"settings written to {env_file}")
    return 0


def _dev_down(args: argparse.Namespace) -> int:
    from devtools import devstack

    env_file = state_dir() / "dev.env"
    devstack.down(read_env_file(env_file))
    env_file.unlink(missing_ok=True)
    print("dev stack stopped")
    return 0


def _dev_status(args: argparse.Namespace) -> int:
    from devtools import devstack

    recorded = read_env_file(state_dir() / "dev.env")
    if not recorded:
        print("dev stack: not started (run `tally dev up`)")
        return 1
    running = devstack.is_running(recorded)
    for name, key in (("kafka", "KAFKA_BOOTSTRAP_SERVERS"), ("postgres", "DATABASE_URL")):
        print(f"{name:<9} {recorded.get(key)}  {'up' if running[name] else 'DOWN'}")
    return 0 if all(running.values()) else 1


def _demo(args: argparse.Namespace) -> int:
    from devtools.demo import run_demo

    return run_demo(tenants=args.tenants, events=args.events)


def register(sub: Subparsers) -> None:
    dev = add_group(sub, "dev", "the embedded dev stack (Tansu + Postgres)")
    dev.add_parser("up", help="start it; addresses go to .tally/dev.env").set_defaults(
        func=_dev_up)
    dev.add_parser("down", help="stop it").set_defaults(func=_dev_down)
    dev.add_parser("status", help="what runs where").set_defaults(func=_dev_status)

    demo = sub.add_parser("demo", help="run the whole pipeline on synthetic traffic")
    demo.add_argument("--tenants", type=positive_int, default=8)
    demo.add_argument("--events", type=positive_int, default=60000)
    demo.set_defaults(func=_demo)
