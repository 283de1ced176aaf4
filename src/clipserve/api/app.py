"""`create_app(settings)`: the FastAPI application of `clipserve serve`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from clipserve import __version__
from clipserve.api import admin, ops, routes, routes_collections
from clipserve.api.auth import KeyStore, RateLimiter, StaticKeys
from clipserve.api.deps import ServerState
from clipserve.api.errors import install_error_handlers
from clipserve.api.metrics import ServerMetrics
from clipserve.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from clipserve.api.playground import mount_playground
from clipserve.api.pool import ModelPool
from clipserve.api.settings import ServerSettings
from clipserve.engine.model import Model

log = logging.getLogger("clipserve.api")


async def _load_configured(pool: ModelPool, settings: ServerSettings) -> None:
    for spec in settings.models:
        try:
            await pool.load(spec, configured=True)
        except Exception as exc:  # /ready reports it; the server stays up for the other models
            log.error("cannot load model %s: %s", spec.source, " ".join(str(exc).split()))


def create_app(settings: ServerSettings, models: Mapping[str, Model] | None = None) -> FastAPI:
    """The server for `settings`.

    `models`: already loaded models by alias (the CLI loads before serving so that a bad model fails the
    command at once; tests pass a small model). Without it, `settings.models` load in the background after
    start-up and `/ready` answers 503 until they are loaded and probed.
    """
    metrics = ServerMetrics()

    def queue_depths() -> dict[str, dict[str, int]]:
        state = getattr(app.state, "server", None)
        return state.pool.queue_depths() if state is not None else {}

    metrics.track_queues(queue_depths)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything with threads or files is made here, so the app can be started again after a shutdown.
        executor = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="clipserve-preprocess")
        pool = ModelPool(settings, executor, metrics)
        state = ServerState(
            settings=settings,
            pool=pool,
            keys=KeyStore(settings.state_dir),
            static_keys=StaticKeys(settings.auth.api_keys),
            admin_keys=StaticKeys((settings.auth.admin_key,) if settings.auth.admin_key else ()),
            limiter=RateLimiter(),
            metrics=metrics,
        )
        app.state.server = state
        if settings.auth.no_auth:
            log.warning("authentication is disabled (--no-auth): anyone who can reach this server can use it")
        loader: asyncio.Task[None] | None = None
        if models is not None:
            for alias, model in models.items():
                await pool.probe(pool.add(alias, model))
        else:
            pool.expect(settings.models)
            loader = asyncio.create_task(_load_configured(pool, settings))
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                loader.cancel()
            # uvicorn has drained in-flight requests by now; finish anything still queued, then stop.
            await asyncio.to_thread(pool.stop)
            executor.shutdown(wait=True, cancel_futures=True)
            state.keys.close()

    app = FastAPI(
        title="clipserve",
        version=__version__,
        description="OpenCLIP models behind an OpenAI-compatible API: embeddings, zero-shot classification, "
        "ranking.",
        lifespan=lifespan,
    )
    install_error_handlers(app, metrics.error)
    app.include_router(routes.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    app.include_router(routes_collections.router)
    mount_playground(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, observe=metrics.observe_request)
    return app
