"""The models a server holds: loading and unloading at run time, lookup by alias, and readiness.

A model is ready when it is loaded, its batch workers run, their last batch succeeded, and a probe (one
text and one small decoded image through the same batchers that serve requests) succeeded. `/ready`
re-probes a model that is not ready, so readiness recovers, and reports the truth, on its own.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from clipserve.api.errors import APIError
from clipserve.api.settings import ModelSpec, ProbeSpec, ServerSettings
from clipserve.engine.batching import BatchedModel, BatchObserver
from clipserve.engine.loading import load
from clipserve.engine.model import Model
from clipserve.train.probe import LinearProbe

log = logging.getLogger("clipserve.api")

PROBE_TIMEOUT_S = 30.0


def _probe_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (127, 64, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


_PROBE_PNG = _probe_image()


async def _probe_outputs(batched: BatchedModel) -> list[torch.Tensor]:
    texts = await batched.prepare_texts(["a photo."])
    pixels = await batched.prepare_images([_PROBE_PNG])
    return list(await asyncio.gather(batched.encode_texts(texts.tokens), batched.encode_images(pixels)))


@dataclass
class ServedModel:
    alias: str
    batched: BatchedModel
    created: int
    ready: bool = False
    problem: str = "not probed yet"
    classifiers: dict[str, LinearProbe] = field(default_factory=dict)  # linear probes by name

    @property
    def model(self) -> Model:
        return self.batched.model


def _same_source(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))


def probe_belongs(probe: LinearProbe, alias: str, source: str, configured_models: int) -> bool:
    """A probe serves the model it was trained on (by alias or source), or the only model configured."""
    return probe.model == alias or _same_source(probe.model, source) or configured_models == 1


def unattached_probes(probes: tuple[ProbeSpec, ...], models: tuple[ModelSpec, ...]) -> list[str]:
    """Probe directories that no configured model would take (checked before serving)."""
    if len(models) == 1:
        return []
    loaded = [(spec, LinearProbe.load(spec.path)) for spec in probes]
    return [
        f"{spec.path} (trained on {probe.model})"
        for spec, probe in loaded
        if not any(probe_belongs(probe, m.alias or m.source, m.source, len(models)) for m in models)
    ]


class ModelPool:
    def __init__(self, settings: ServerSettings, pool: ThreadPoolExecutor, observer: BatchObserver) -> None:
        self.settings = settings
        self._pool = pool
        self._observer = observer
        self._served: dict[str, ServedModel] = {}
        # Models that should be served but are not (yet): alias -> why ("loading", or the load error).
        self._pending: dict[str, str] = {}
        self._probes = [(spec.key, LinearProbe.load(spec.path)) for spec in settings.probes]

    # -- membership ------------------------------------------------------------------------------------

    def add(self, alias: str, model: Model) -> ServedModel:
        if alias in self._served:
            raise APIError(409, f"a model named {alias!r} is already loaded", param="alias", code="model_exists")
        batched = BatchedModel(
            alias, model, self._pool, self.settings.batching, self.settings.limits.image_limits, self._observer
        )
        batched.start()
        served = ServedModel(alias, batched, int(time.time()))
        for name, probe in self._probes:
            if probe_belongs(probe, alias, model.info.source, len(self.settings.models)):
                if probe.embed_dim != model.embed_dim:
                    raise APIError(400, f"classifier {name!r} expects {probe.embed_dim}-d features, model "
                                   f"{alias!r} gives {model.embed_dim}", param="probe")
                served.classifiers[name] = probe
        self._served[alias] = served
        self._pending.pop(alias, None)
        return served

    async def load(self, spec: ModelSpec, *, configured: bool = False) -> ServedModel:
        """Load in a worker thread (the server keeps serving), add, probe.

        A configured (startup) model that fails to load stays listed as failed, so `/ready` says why; a
        model loaded through the admin API that fails is just reported to that caller.
        """
        key = spec.alias or spec.source
        if key in self._served or self._pending.get(key) == "loading" and not configured:
            raise APIError(409, f"model {key!r} is already loaded or loading", param="alias", code="model_exists")
        self._pending[key] = "loading"
        try:
            model = await asyncio.to_thread(
                load, spec.source, device=self.settings.device, precision=self.settings.precision,
                backend=self.settings.backend,
            )
        except Exception as exc:
            if configured:
                self._pending[key] = f"failed to load: {' '.join(str(exc).split())[:300]}"
            else:
                self._pending.pop(key, None)
            raise
        self._pending.pop(key, None)
        served = self.add(spec.alias or model.info.name, model)
        await self.probe(served)
        return served

    def expect(self, specs: tuple[ModelSpec, ...]) -> None:
        """Mark configured models as coming: not ready until each is loaded and probed."""
        for spec in specs:
            self._pending.setdefault(spec.alias or spec.source, "loading")

    def unload(self, alias: str) -> None:
        served = self._served.pop(alias, None)
        if served is None:
            if self._pending.pop(alias, None) is not None:
                return
            raise APIError(404, f"no model named {alias!r} is loaded", param="alias", code="model_not_found")
        served.batched.stop()  # finishes what is queued

    def stop(self) -> None:
        for served in self._served.values():
            served.batched.stop()
        self._served.clear()

    # -- lookup ----------------------------------------------------------------------------------------

    def get(self, name: str) -> ServedModel:
        served = self._served.get(name)
        if served is None:
            served = next((s for s in self._served.values() if name in (s.model.info.name, s.model.info.source)),
                          None)
        if served is not None:
            return served
        if name in self._pending:
            raise APIError(503, f"model {name!r} is not available: {self._pending[name]}", param="model",
                           code="model_not_ready", headers={"Retry-After": "5"})
        known = ", ".join(sorted(self._served)) or "none"
        raise APIError(404, f"model {name!r} not found; loaded: {known}", param="model", code="model_not_found")

    def served(self) -> list[ServedModel]:
        return list(self._served.values())

    def queue_depths(self) -> dict[str, dict[str, int]]:
        return {alias: s.batched.queue_depth for alias, s in list(self._served.items())}

    # -- readiness -------------------------------------------------------------------------------------

    async def probe(self, served: ServedModel) -> bool:
        batched = served.batched
        try:
            outputs = await asyncio.wait_for(_probe_outputs(batched), PROBE_TIMEOUT_S)
            if any(not bool(out.isfinite().all()) for out in outputs):
                raise RuntimeError("probe produced non-finite embeddings")
        except Exception as exc:
            served.ready, served.problem = False, f"probe failed: {type(exc).__name__}: {exc}"
            log.warning("model %s not ready: %s", served.alias, served.problem)
            return False
        served.ready, served.problem = True, "ready"
        return True

    async def readiness(self) -> dict[str, str]:
        """Per expected model: 'ready' or why not (re-probing those that are not ready)."""
        status = dict(self._pending)
        for served in list(self._served.values()):
            if (not served.batched.healthy or not served.ready) and await self.probe(served):
                if not served.batched.healthy:  # the probe passed, so a worker thread is gone
                    served.ready, served.problem = False, "inference workers are not running"
            status[served.alias] = served.problem
        return status
