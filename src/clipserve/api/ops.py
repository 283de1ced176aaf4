"""Operations routes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from clipserve.api.auth import Caller
from clipserve.api.deps import authorize, server_state
from clipserve.api.errors import AUTH_ERRORS
from clipserve.api.schemas import Health, Readiness

router = APIRouter()

# Routes that answer without a key (orchestrators probe them); every other route needs one.
PUBLIC_PATHS = frozenset({"/", "/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process is alive and serving HTTP."""
    return Health()


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def ready(request: Request) -> JSONResponse:
    """200 when every configured model is loaded and a probe inference through its batchers succeeded."""
    status = await server_state(request).pool.readiness()
    ok = bool(status) and all(v == "ready" for v in status.values())
    body = Readiness(status="ready" if ok else "not_ready", models=status)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}, **AUTH_ERRORS},
)
async def metrics(request: Request, caller: Caller = Depends(authorize)) -> Response:
    """Prometheus text format: requests and latencies per route and model, batch sizes, queue depth,
    images decoded, errors by type."""
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
