"""Serving the API with uvicorn until SIGTERM/SIGINT (uvicorn drains requests, then the
app's lifespan closes the producer, flushing what it holds, and the pool).

uvicorn runs on uvloop with the httptools parser, named here rather than left to "auto"
so that a missing package fails at start instead of silently serving on the pure-Python
h11 parser and asyncio loop, which cost more CPU per request than a consume's decision
(bench/results/notes.md)."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from runtime.gc_tuning import tune_gc
from runtime.settings import Settings

# How long an idle client connection stays open. uvicorn's default, 5 s, is shorter than a
# load balancer's idle timeout (60 s on the common ones): the balancer would reuse a
# connection the API is closing (a 502 for that request), and every service pausing for
# more than 5 s pays a new connection on its next consume. Longer than the balancer's, so
# the balancer closes first.
KEEP_ALIVE_SECONDS = 75


def serve(settings: Settings, host: str, port: int) -> None:
    app = create_app(settings)
    # A full collection walked every object the imports and the app made (FastAPI's and
    # pydantic's are many): pauses of tens of ms in the consume tail (notes.md).
    tune_gc()
    uvicorn.run(app, host=host, port=port, log_level="warning",
                access_log=False, proxy_headers=False, server_header=False,
                loop="uvloop", http="httptools", timeout_keep_alive=KEEP_ALIVE_SECONDS)
