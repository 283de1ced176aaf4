"""Admin routes (admin key only): models at run time, API keys, usage."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from clipserve.api.auth import KeyRecord
from clipserve.api.deps import authorize_admin, server_state
from clipserve.api.errors import ADMIN_ERRORS, APIError
from clipserve.api.routes import model_card
from clipserve.api.schemas import (
    CreatedKey,
    CreateKeyRequest,
    KeyInfo,
    KeyList,
    LoadModelRequest,
    ModelCard,
    UsageEntry,
    UsageList,
)
from clipserve.api.settings import KeyLimits, ModelSpec

router = APIRouter(prefix="/admin", dependencies=[Depends(authorize_admin)], responses=ADMIN_ERRORS)


def _key_info(record: KeyRecord) -> KeyInfo:
    return KeyInfo(
        key_id=record.key_id, name=record.name, created=record.created, revoked=record.revoked,
        rate_limit_rpm=record.limits.rate_limit_rpm, quota_images=record.limits.quota_images,
        quota_tokens=record.limits.quota_tokens,
    )


@router.post("/models", response_model=ModelCard, status_code=201)
async def load_model(body: LoadModelRequest, request: Request) -> ModelCard:
    """Load a model while the server keeps serving; it is listed once loaded and probed."""
    try:
        spec = ModelSpec(body.model, body.alias)
    except ValueError as exc:
        raise APIError(400, str(exc), param="alias") from None
    pool = server_state(request).pool
    try:
        served = await pool.load(spec)
    except APIError:
        raise
    except Exception as exc:
        raise APIError(400, f"cannot load {body.model!r}: {' '.join(str(exc).split())[:500]}", param="model",
                       code="model_load_failed") from None
    return model_card(served)


@router.delete("/models/{alias:path}", status_code=204, response_class=Response)
async def unload_model(alias: str, request: Request) -> Response:
    """Stop serving a model (requests already queued for it finish first)."""
    server_state(request).pool.unload(alias)
    return Response(status_code=204)


@router.get("/keys", response_model=KeyList)
async def list_keys(request: Request) -> KeyList:
    return KeyList(data=[_key_info(r) for r in server_state(request).keys.list()])


@router.post("/keys", response_model=CreatedKey, status_code=201)
async def create_key(body: CreateKeyRequest, request: Request) -> CreatedKey:
    """A new API key; the response is the only place the key ever appears."""
    limits = KeyLimits(body.rate_limit_rpm, body.quota_images, body.quota_tokens)
    record, key = server_state(request).keys.create(body.name, limits)
    return CreatedKey(**_key_info(record).model_dump(), key=key)


@router.delete("/keys/{key_id}", status_code=204, response_class=Response)
async def revoke_key(key_id: str, request: Request) -> Response:
    if not server_state(request).keys.revoke(key_id):
        raise APIError(404, f"no active key {key_id!r}", param="key_id", code="key_not_found")
    return Response(status_code=204)


@router.get("/usage", response_model=UsageList)
async def usage(request: Request, key_id: str | None = None, day: str | None = None) -> UsageList:
    """Requests, images and text tokens per key and UTC day (filter with ?key_id= and ?day=YYYY-MM-DD)."""
    records = server_state(request).keys.usage(key_id, day)
    return UsageList(data=[UsageEntry(**vars(r)) for r in records])

