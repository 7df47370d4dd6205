"""A pool of vLLM serving replicas for the WISE-edited model, with hot, versioned, rolling publishes.

Each :class:`ServingReplica` is a Ray actor that owns one vLLM engine (``AsyncLLM``) and serves vLLM's own
OpenAI-compatible app (``/v1/completions``, ``/v1/models``, ``/metrics``, ...) from the same event loop. The
engine runs the routed architecture of :mod:`serving.vllm_model`; a publish goes through the engine handle the
actor owns (``collective_rpc`` into :mod:`serving.vllm_worker`), never over HTTP: vLLM's runtime-control
endpoints (``VLLM_SERVER_DEV_MODE``) are forced off. Binding anything but loopback requires an API key, and
then every path but ``/health``, ``/ping`` and ``/metrics`` requires it (vLLM's own check guards only ``/v1``).

:class:`ServingPool` publishes to its replicas one at a time (rolling): the others keep answering, a replica
answers throughout its own publish (the buffers change between two engine steps), and each replica receives
only the memories it does not hold yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from wise.publish import PublishError, ServingSnapshot, encode_package

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/ping", "/metrics")


class ServingError(RuntimeError):
    """A replica that cannot start or a publish that did not reach every replica."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ReplicaSpec:
    """How to start one serving replica.

    Attributes:
        model: checkpoint directory (HF layout) of the unedited model.
        layer / module / reduce / layout: the edited projection, the router reduction and the memory layout
            (from the state it serves).
        host / port: where the OpenAI server listens; port 0 picks a free one. Replicas of one pool share
            ``port``: each takes the first free one of ``port .. port + port_tries - 1`` on its node, so one
            replica per node (a pod) always gets ``port`` itself.
        api_key: required on every non-health path; mandatory unless ``host`` is loopback.
        served_name: the model name clients send (``/v1/models``).
        dtype / max_model_len / kv_cache_gib / capacity: engine settings (capacity = side-memory slots
            allocated at start; grown on demand).
        cpus / gpus: the actor's Ray resources.
    """

    model: str
    layer: int
    module: str = "mlp.down_proj"
    reduce: str = "mean"
    layout: str = "keyed"
    host: str = "127.0.0.1"
    port: int = 0
    port_tries: int = 1
    api_key: str | None = None
    served_name: str = "wise"
    dtype: str = "float32"
    max_model_len: int = 1024
    kv_cache_gib: float = 1.0
    capacity: int = 16
    cpus: float = 1.0
    gpus: float = 0.0
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        if not is_loopback(self.host) and not self.api_key:
            raise ServingError(
                f"serving on {self.host} (not loopback) requires an API key: set publish.api_key_env / "
                "--api-key-env to the name of an environment variable holding it"
            )

    def cli_args(self, port: int) -> list[str]:
        """vLLM server arguments: the routed architecture, eager mode, no prefix caching or chunked prefill
        (both would split one prompt's routing decision), the worker extension for publishes."""
        overrides = {
            "architectures": ["WiseLlamaForCausalLM"],
            "wise_layer": self.layer,
            "wise_module": self.module,
            "wise_reduce": self.reduce,
            "wise_layout": self.layout,
            "wise_capacity": self.capacity,
        }
        args = [
            "--model", self.model,
            "--served-model-name", self.served_name,
            "--host", self.host,
            "--port", str(port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--hf-overrides", json.dumps(overrides),
            "--worker-extension-cls", "serving.vllm_worker.WiseWorkerExtension",
            "--no-enable-prefix-caching",
            "--no-enable-chunked-prefill",
            "--enforce-eager",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if self.api_key:
            args += ["--api-key", self.api_key]
        return args + list(self.extra_args)


class _VersionRoute:
    """ASGI wrapper answering ``GET /wise/version`` (version served, live memories) from the replica itself."""

    def __init__(self, app, replica: ServingReplica) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/wise/version":
            from starlette.responses import JSONResponse

            info = await self.replica.info()
            body = {"version": info["version"], "memories": info["memories"], "name": self.replica.name}
            await JSONResponse(body)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _GuardAll:
    """ASGI middleware: with an API key, every path but the open ones needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and scope["path"] not in OPEN_PATHS:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode(errors="replace")
            scheme, _, token = auth.partition(" ")
            given = hashlib.sha256(token.encode()).digest()
            if scheme.lower() != "bearer" or not secrets.compare_digest(given, self._digest):
                from starlette.responses import JSONResponse

                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _bind(host: str, port: int, tries: int):
    """A socket bound to the first free port of ``port .. port + tries - 1`` (any free one for 0)."""
    import socket

    last: OSError | None = None
    for p in [0] if port == 0 else range(port, port + max(1, tries)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, p))
            return sock
        except OSError as err:
            sock.close()
            last = err
    raise ServingError(f"no free port in {port}..{port + tries - 1} on {host}: {last}")


class ServingReplica:
    """Ray actor body (async): one vLLM engine + its OpenAI HTTP server, publish through the engine handle."""

    def __init__(self, spec: ReplicaSpec, name: str = "replica-0") -> None:
        spec.check()
        self.spec = spec
        self.name = name
        self.engine = None
        self.server = None
        self.task: asyncio.Task | None = None
        self.port = 0
        self.version = 0
        self.publishes = 0

    async def start(self, timeout_s: float = 600.0) -> dict:
        """Start the engine and the HTTP server; returns :meth:`info` once ``/health`` answers."""
        os.environ["VLLM_SERVER_DEV_MODE"] = "0"  # never the runtime-control endpoints
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.spec.kv_cache_gib))))
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        import uvicorn
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        sock = _bind(self.spec.host, self.spec.port, self.spec.port_tries)
        self.port = sock.getsockname()[1]
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(self.spec.cli_args(self.port))
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        self.engine = AsyncLLM.from_vllm_config(vllm_config=vllm_config, disable_log_stats=False)
        tasks = await self.engine.get_supported_tasks()
        app = build_app(args, tasks, self.engine.model_config)
        await init_app_state(self.engine, app.state, args, tasks)
        asgi = _VersionRoute(app, self)
        asgi = _GuardAll(asgi, self.spec.api_key) if self.spec.api_key else asgi
        config = uvicorn.Config(asgi, log_level="warning", access_log=False, timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self.task.done():
                raise ServingError(f"{self.name}: HTTP server exited: {self.task.exception()!r}")
            if time.monotonic() > deadline:
                raise ServingError(f"{self.name}: not serving after {timeout_s:.0f} s")
            await asyncio.sleep(0.1)
        logger.info("%s serving %s on http://%s:%d", self.name, self.spec.model, self.spec.host, self.port)
        return await self.info()

    async def publish(self, package: bytes) -> dict:
        """Install a package (:func:`wise.publish.encode_package`) in every worker; returns :meth:`info`."""
        t0 = time.perf_counter()
        try:
            results = await self.engine.collective_rpc("wise_publish", args=(package,))
        except Exception as err:  # noqa: BLE001 - the worker's error crosses a process boundary as text
            raise PublishError(f"{self.name}: {err}") from err
        versions = {r["version"] for r in results}
        if len(versions) != 1:
            raise ServingError(f"{self.name}: workers disagree on the served version: {sorted(versions)}")
        self.version = versions.pop()
        self.publishes += 1
        info = await self.info(results[0])
        info["seconds"] = time.perf_counter() - t0
        return info

    async def set_routing(self, enabled: bool) -> bool:
        await self.engine.collective_rpc("wise_set_routing", args=(enabled,))
        return enabled

    async def info(self, worker: dict | None = None) -> dict:
        if worker is None:
            worker = (await self.engine.collective_rpc("wise_info"))[0]
        host = self.spec.host if self.spec.host != "0.0.0.0" else "127.0.0.1"
        return {
            "name": self.name,
            "url": f"http://{host}:{self.port}",
            "version": worker["version"],
            "ids": worker["ids"],
            "memories": worker["count"],
            "publishes": self.publishes,
        }

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            if self.task is not None:
                await asyncio.wait([self.task], timeout=10)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


class ServingPool:
    """K serving replicas as Ray actors, published to one at a time.

    Args:
        spec: replica settings; every replica takes the first free port from ``spec.port`` on its node (replicas
            sharing a machine get ``port``, ``port + 1``, ...), or any free port when 0.
        replicas: K.
        metrics: optional :class:`orchestrator.telemetry.metrics.JobMetrics`-like sink: ``publish_succeeded(replica,
            version, seconds)``, ``publish_failed(replica, error)``, and ``edits_served(edit_ids, version)``
            once the first replica serves a version (freshness).
    """

    def __init__(self, spec: ReplicaSpec, replicas: int = 1, metrics=None) -> None:
        if replicas < 1:
            raise ValueError(f"a serving pool needs at least one replica, not {replicas}")
        spec.check()
        self.spec = spec
        self.k = replicas
        self.metrics = metrics
        self.actors: list[Any] = []
        self.held: dict[str, list[str]] = {}
        self.infos: dict[str, dict] = {}
        self.version = 0
        self.start_timeout_s = 900.0

    def start(self) -> list[dict]:
        """Create the replicas (in parallel) and wait until each serves; returns their infos."""
        import ray

        # the engine's processes start from the actor: the actor's own env and working directory carry over
        actor_cls = ray.remote(ServingReplica).options(
            num_cpus=self.spec.cpus, num_gpus=self.spec.gpus, max_concurrency=64
        )
        specs = [replace(self.spec, port_tries=self.k) for _ in range(self.k)]
        self.actors = [actor_cls.remote(s, f"replica-{i}") for i, s in enumerate(specs)]
        try:
            infos = ray.get([a.start.remote() for a in self.actors], timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            self.stop()
            raise ServingError(
                f"{self.k} serving replica(s) not up within {self.start_timeout_s:.0f} s: does the cluster have "
                f"{self.spec.cpus:g} free CPU(s) per replica next to the editors (runtime.editor_cpus each)?"
            ) from err
        except Exception as err:
            self.stop()
            raise ServingError(f"serving replicas failed to start: {err}") from err
        for info in infos:
            self.infos[info["name"]] = info
            self.held[info["name"]] = list(info["ids"])
        return infos

    @property
    def urls(self) -> list[str]:
        return [i["url"] for i in self.infos.values()]

    def publish(self, snapshot: ServingSnapshot, version: int | None = None) -> dict:
        """Rolling publish of ``snapshot`` as ``version`` (default: last + 1).

        Returns:
            ``{"version", "seconds" (call to all replicas serving it), "replicas": {name: seconds},
            "bytes": {name: package size}}``.

        Raises:
            ServingError: a replica failed twice (once with its diff, once with the full package).
        """
        import ray

        version = self.version + 1 if version is None else int(version)
        if version <= self.version:
            raise ValueError(f"version {version} is not above the served {self.version}")
        t0 = time.perf_counter()
        per, sizes, failed = {}, {}, []
        for actor, name in zip(self.actors, list(self.infos), strict=True):
            package = encode_package(snapshot, version, self.held.get(name, ()))
            try:
                info = ray.get(actor.publish.remote(package))
            except Exception as err:  # noqa: BLE001 - retry once with every memory included
                logger.warning(
                    "publish v%d to %s failed (%s); retrying with the full package", version, name, err
                )
                package = encode_package(snapshot, version, ())
                try:
                    info = ray.get(actor.publish.remote(package))
                except Exception as err2:  # noqa: BLE001
                    failed.append(f"{name}: {err2}")
                    if self.metrics is not None:
                        self.metrics.publish_failed(name, type(err2).__name__)
                    continue
            self.held[name] = list(info["ids"])
            self.infos[name] = {k: v for k, v in info.items() if k != "seconds"}
            per[name], sizes[name] = info["seconds"], len(package)
            if self.metrics is not None:
                self.metrics.publish_succeeded(name, version, info["seconds"])
                if len(per) == 1:  # the first replica serving this version: its edits are now served
                    self.metrics.edits_served(snapshot.edit_ids, version)
        if failed:
            raise ServingError(f"publish of version {version} failed on {len(failed)} replica(s): {failed}")
        self.version = version
        return {"version": version, "seconds": time.perf_counter() - t0, "replicas": per, "bytes": sizes}

    def versions(self) -> dict[str, int]:
        """The version each replica reports serving (asked now, not remembered)."""
        import ray

        infos = ray.get([a.info.remote() for a in self.actors])
        return {i["name"]: i["version"] for i in infos}

    def set_routing(self, enabled: bool) -> None:
        import ray

        ray.get([a.set_routing.remote(enabled) for a in self.actors])

    def stop(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.get(a.stop.remote(), timeout=30)
            except Exception as err:  # noqa: BLE001 - best effort, the actor is killed next
                logger.debug("replica stop: %s", err)
            ray.kill(a)
        self.actors = []
