"""`clipserve serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from clipserve.cli.common import (
    BACKEND_CHOICES,
    COMPILE_HELP,
    FAST_DECODE_HELP,
    PRECISION_CHOICES,
    PRECISION_HELP,
)
from clipserve.cli.main import CLIError
from clipserve.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from clipserve.api.settings import ServerSettings
    from clipserve.engine.model import Model

log = logging.getLogger("clipserve.serve")

MB = 2**20


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "clipserve"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API",
        description="Serve CLIP models: /v1/embeddings (text and images), /v1/classifications, /v1/rankings.",
    )
    p.add_argument("--model", action="append", metavar="NAME[=ALIAS]",
                   help=f"model to serve (repeatable): a pretrained name, hf-hub:REPO or a checkpoint directory, "
                   f"optionally with the alias clients use (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--backend", default="torch", choices=BACKEND_CHOICES,
                   help="torch, or onnx (ONNX Runtime on an export cached per checkpoint)")
    p.add_argument("--probe", action="append", default=[], metavar="DIR[=NAME]",
                   help="a linear probe (`clipserve probe` output) to serve as a fixed-class classifier: "
                   "clients pass \"classifier\": NAME to /v1/classifications (repeatable)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help=f"where the API-key database lives (default: {_default_state_dir()})")

    auth = p.add_argument_group("authentication")
    auth.add_argument("--api-key", default=os.environ.get("CLIPSERVE_API_KEY"),
                      help="a single static API key (or env CLIPSERVE_API_KEY)")
    auth.add_argument("--admin-key", default=os.environ.get("CLIPSERVE_ADMIN_KEY"),
                      help="key for the /admin routes (or env CLIPSERVE_ADMIN_KEY); needed to create API keys")
    auth.add_argument("--no-auth", action="store_true", help="serve without authentication (logged as a warning)")
    auth.add_argument("--rate-limit", type=int, default=None, metavar="RPM",
                      help="requests per minute for the static key and --no-auth callers")
    auth.add_argument("--quota-images", type=int, default=None, help="images per UTC day, same callers")
    auth.add_argument("--quota-tokens", type=int, default=None, help="text tokens per UTC day, same callers")

    batching = p.add_argument_group("batching")
    batching.add_argument("--max-batch-size", type=int, default=32)
    batching.add_argument("--max-wait-ms", type=float, default=5.0,
                          help="longest wait for a batch to fill (default: 5)")
    batching.add_argument("--max-queue", type=int, default=1024,
                          help="items waiting per model before requests get 429 (default: 1024)")
    batching.add_argument("--preprocess-workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                          help="threads decoding and preprocessing images")
    batching.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)

    limits = p.add_argument_group("limits")
    limits.add_argument("--max-body-mb", type=float, default=64.0)
    limits.add_argument("--max-items", type=int, default=256, help="input items per request")
    limits.add_argument("--max-image-mb", type=float, default=16.0)
    limits.add_argument("--max-image-pixels", type=int, default=40_000_000)
    limits.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS")

    fetch = p.add_argument_group("image URLs")
    fetch.add_argument("--allow-url-fetch", action="store_true",
                       help="fetch http(s) image URLs (public addresses only) from --url-allow-host hosts")
    fetch.add_argument("--url-allow-host", action="append", default=[], metavar="HOST",
                       help="host allowed for URL fetching (repeatable; '*.example.com', or '*' for any)")
    fetch.add_argument("--url-timeout", type=float, default=10.0, metavar="SECONDS")

    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.set_defaults(func=run)


def build_settings(args: argparse.Namespace) -> ServerSettings:
    # Imported here, not at the top: `clipserve --help` should not pay for FastAPI and torch.
    from clipserve.api.settings import AuthSettings, KeyLimits, Limits, ModelSpec, ProbeSpec, ServerSettings
    from clipserve.engine.batching import BatchSettings
    from clipserve.io.fetch import FetchPolicy

    try:
        limits = Limits(
            max_body_bytes=int(args.max_body_mb * MB),
            max_items=args.max_items,
            max_image_bytes=int(args.max_image_mb * MB),
            max_image_pixels=args.max_image_pixels,
            request_timeout_s=args.request_timeout,
        )
        return ServerSettings(
            models=tuple(ModelSpec.parse(m) for m in (args.model or [DEFAULT_MODEL])),
            probes=tuple(ProbeSpec.parse(p) for p in args.probe),
            host=args.host,
            port=args.port,
            state_dir=args.state_dir or _default_state_dir(),
            device=args.device,
            precision=args.precision,
            backend=args.backend,
            compile=args.compile,
            auth=AuthSettings(
                api_keys=(args.api_key,) if args.api_key else (),
                admin_key=args.admin_key,
                no_auth=args.no_auth,
                default_limits=KeyLimits(args.rate_limit, args.quota_images, args.quota_tokens),
            ),
            limits=limits,
            batching=BatchSettings(args.max_batch_size, args.max_wait_ms, args.max_queue, args.fast_decode),
            fetch=FetchPolicy(
                enabled=args.allow_url_fetch,
                allowed_hosts=tuple(args.url_allow_host),
                timeout_s=args.url_timeout,
                max_bytes=limits.max_image_bytes,
            ),
            preprocess_workers=args.preprocess_workers,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_models(settings: ServerSettings) -> dict[str, Model]:
    """Load every model before serving, so that a bad one fails the command with one line."""
    from clipserve.engine.loading import load
    from clipserve.io.hub import HubError

    loaded: dict[str, Model] = {}
    for spec in settings.models:
        try:
            model = load(
                spec.source,
                device=settings.device,
                precision=settings.precision,
                backend=settings.backend,
                compile=settings.compile,
            )
        except HubError as exc:
            if spec.source == DEFAULT_MODEL:
                raise CLIError(
                    f"cannot fetch the default model {DEFAULT_MODEL} ({_one_line(exc)}); pass a local checkpoint "
                    "directory with --model PATH, or run `make demo`", code=1
                ) from None
            raise CLIError(f"cannot load model {spec.source}: {_one_line(exc)}", code=1) from None
        except Exception as exc:
            raise CLIError(f"cannot load model {spec.source}: {_one_line(exc)}", code=1) from None
        alias = spec.alias or model.info.name
        if alias in loaded:
            raise CLIError(f"two models are named {alias!r}: give one an alias with --model NAME=ALIAS")
        loaded[alias] = model
        log.info("loaded %s as %r on %s (%s)", spec.source, alias, model.info.device, model.info.precision)
    return loaded


def check_probes(settings: ServerSettings) -> None:
    """Every --probe must load and belong to a served model, before serving."""
    from clipserve.api.pool import unattached_probes
    from clipserve.train.probe import ProbeError

    try:
        orphans = unattached_probes(settings.probes, settings.models)
    except ProbeError as exc:
        raise CLIError(str(exc)) from None
    if orphans:
        raise CLIError(f"no served model for probe {orphans[0]}: serve that model, e.g. --model SOURCE")


def _check_auth(settings: ServerSettings) -> None:
    from clipserve.api.auth import KeyStore

    auth = settings.auth
    if auth.no_auth or auth.api_keys or auth.admin_key:
        return
    store = KeyStore(settings.state_dir)
    try:
        if any(r.revoked is None for r in store.list()):
            return
    finally:
        store.close()
    raise CLIError(
        "no way for clients to authenticate: pass --api-key KEY, --admin-key KEY (then create keys with "
        "POST /admin/keys), or --no-auth"
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from clipserve.api.app import create_app
    from clipserve.api.logs import configure_json_logging

    settings = build_settings(args)
    if args.log_format == "json":
        configure_json_logging(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    # Models first: `make serve` on an offline machine must say what to pass instead of the default model.
    models = load_models(settings)
    check_probes(settings)
    _check_auth(settings)
    app = create_app(settings, models)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
    )
    return 0
