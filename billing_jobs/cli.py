"""`tally jobs ...`: the billing jobs."""

from __future__ import annotations

import argparse

from tally.cli import Subparsers, add_group, settings


def _push_usage(args: argparse.Namespace) -> int:
    from billing_jobs.push_usage import run_push_usage

    result = run_push_usage(settings())
    print(result.summary())
    return 0 if not result.failed else 1


def register(sub: Subparsers) -> None:
    jobs = add_group(sub, "jobs", "billing jobs")
    jobs.add_parser("push-usage", help="send period usage to Stripe as meter events"
                    ).set_defaults(func=_push_usage)
