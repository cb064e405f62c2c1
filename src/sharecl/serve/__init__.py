"""``sharecl serve``: one model answering for every task of a store over HTTP (FastAPI on uvicorn).

Three parts, each usable on its own:

- :class:`StoreWatcher` (:mod:`.watcher`) holds the store version being served and polls
  ``manifest.json``; a new version written by another process (``sharecl learn`` /
  ``add-adapter``) is loaded and checked in the background, then one reference is swapped, so
  no request sees half a version. A version that fails to load is logged once and retried with
  a back-off while the last good one keeps answering (``/health`` says so).
- :class:`MicroBatcher` (:mod:`.batcher`) gathers requests for any tasks into one mixed-task
  forward; a request whose rows make the forward fail fails alone.
- :func:`create_app` (:mod:`.app`) builds the FastAPI application: ``POST /predict``,
  ``GET /tasks``, ``GET /health`` and the OpenAPI schema; limits and 4xx JSON errors.
"""

from __future__ import annotations

import os

from sharecl.serve.app import ServeConfig, create_app
from sharecl.serve.batcher import MicroBatcher
from sharecl.serve.watcher import Loaded, StoreWatcher

__all__ = ["ServeConfig", "Loaded", "StoreWatcher", "MicroBatcher", "create_app", "serve"]


def serve(store: str | os.PathLike, config: ServeConfig | None = None, log=print) -> None:
    """Load ``store`` and serve it with uvicorn until interrupted.

    Raises:
        StoreError: if the store cannot be loaded.
        ValueError: ``config.top_tasks`` on a store that is not an aligned Share store.
    """
    import uvicorn

    cfg = config or ServeConfig()
    watcher = StoreWatcher(store, device=cfg.device, interval_s=cfg.reload_interval_s, log=log, precision=cfg.precision,
                           top_tasks=cfg.top_tasks)
    cur = watcher.current
    log(f"serving {store} (version {cur.version}, method {cur.method.name}, {len(cur.classes)} tasks) "
        f"on http://{cfg.host}:{cfg.port}  (OpenAPI: /docs, /openapi.json)")
    uvicorn.run(create_app(watcher, cfg), host=cfg.host, port=cfg.port, log_level="warning")
