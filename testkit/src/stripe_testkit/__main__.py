"""``python -m stripe_testkit``: serve the Stripe double in the foreground.

The first line on stdout is ``stripe double listening on http://HOST:PORT``; other
processes (the demo) read the address from it. SIGTERM or SIGINT stops it, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from stripe_testkit.server import StripeDouble

__all__ = ["main"]

_log = logging.getLogger("stripe_testkit")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the double in the foreground until SIGTERM or SIGINT; exit 0."""
    parser = argparse.ArgumentParser(
        prog="python -m stripe_testkit", description="Serve the Stripe double."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111, help="0 picks a free port")
    parser.add_argument("--webhook-url", help="deliver thin events (meter error reports) here")
    parser.add_argument("--webhook-secret", default="whsec_stripe_double",
                        help="sign them with this endpoint secret")
    parser.add_argument("--memory-hours", type=float, default=24.0,
                        help="how long idempotency keys and meter event identifiers are "
                        "remembered (Stripe: at least 24)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        _log.info("stripe double stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Serve from a worker thread: shutdown() called from the serving thread deadlocks.
    with StripeDouble(host=args.host, port=args.port, memory=int(args.memory_hours * 3600),
                      webhook_url=args.webhook_url,
                      webhook_secret=args.webhook_secret) as double:
        print(f"stripe double listening on {double.url}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
