"""Per-server state and the FastAPI dependencies that check who is calling."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from clipserve.api.auth import Caller, KeyStore, RateLimiter, StaticKeys
from clipserve.api.errors import APIError
from clipserve.api.metrics import ServerMetrics
from clipserve.api.pool import ModelPool
from clipserve.api.settings import KeyLimits, ServerSettings

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")

UNLIMITED = KeyLimits()


@dataclass
class ServerState:
    settings: ServerSettings
    pool: ModelPool
    keys: KeyStore
    static_keys: StaticKeys
    admin_keys: StaticKeys
    limiter: RateLimiter
    metrics: ServerMetrics


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _identify(state: ServerState, credentials: HTTPAuthorizationCredentials | None) -> Caller | None:
    """The caller a bearer key belongs to, or None for no key; 401 for a key that matches nothing."""
    if credentials is None or not credentials.credentials:
        return None
    key = credentials.credentials
    if state.settings.auth.admin_key is not None and key in state.admin_keys:
        return Caller("admin", UNLIMITED, admin=True)
    if key in state.static_keys:
        return Caller("static", state.settings.auth.default_limits)
    record = state.keys.verify(key)
    if record is None:
        raise _unauthorized("invalid or revoked API key")
    return Caller(record.key_id, record.limits)


def _rate_limit(state: ServerState, caller: Caller) -> None:
    rpm = caller.limits.rate_limit_rpm
    if rpm is None:
        return
    wait = state.limiter.acquire(caller.key_id, rpm)
    if wait > 0:
        raise APIError(
            429, f"rate limit of {rpm} requests per minute reached; retry in {wait:.1f}s",
            code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


async def authorize(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> Caller:
    """Any valid key (or anyone under --no-auth), then that key's rate limit."""
    state = server_state(request)
    if state.settings.auth.no_auth:
        # Clients that must send some key (the openai SDK does) send placeholders like "EMPTY": ignore them.
        try:
            caller = _identify(state, credentials)
        except APIError:
            caller = None
        caller = caller or Caller("anonymous", state.settings.auth.default_limits)
    else:
        caller = _identify(state, credentials)
        if caller is None:
            raise _unauthorized("missing API key: send 'Authorization: Bearer KEY'")
    request.state.key_id = caller.key_id
    _rate_limit(state, caller)
    return caller


async def authorize_admin(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> Caller:
    """The admin key only (403 for a valid non-admin key; admin routes are off without an admin key)."""
    state = server_state(request)
    caller = _identify(state, credentials)
    if caller is None:
        raise _unauthorized("missing admin key: send 'Authorization: Bearer ADMIN_KEY'")
    request.state.key_id = caller.key_id
    if not caller.admin:
        detail = "this route needs the admin key"
        if state.settings.auth.admin_key is None:
            detail = "the admin API is disabled (start the server with --admin-key)"
        raise APIError(403, detail, code="admin_only")
    return caller
