"""Python client for gpu-manager, the daemon that keeps a host's GPU services started
and stopped so that what is wanted fits in VRAM.

    from gpu_manager_client import GpuManager, GpuManagerError, gpu_lock

    gm = GpuManager()                 # GPU_MANAGER_URL / GPU_MANAGER_TOKEN, else 127.0.0.1:8000
    if gm.can_fit(4096): ...
    gm.prepare_for_phase(3)           # the transition report; raises on refusal
    gm.stop("comfyui", force=True)    # skip draining: its work in flight is lost
    with gm.claim("comfyui", ttl=600, holder="render-job-42"):  # never taken away meanwhile
        render()
    gm.proxies()["ollama"].in_flight  # a proxied service's traffic and demand
    with gpu_lock("redis://127.0.0.1:6379"):   # the v1 redis-py Lock, unchanged
        run_my_gpu_job()

Errors are :class:`GpuManagerError` (``.status``, ``.kind``, ``.body``); its subclasses
name the daemon's error kinds so callers can catch them by meaning.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, Dict, Iterator, List, Optional, Type

import requests

__all__ = [
    "GpuManager",
    "GpuManagerError",
    "Unreachable",
    "Unauthorized",
    "BadRequest",
    "NotFound",
    "NoSuchClaim",
    "CannotFit",
    "Claimed",
    "ClaimSession",
    "ProxyStatus",
    "Busy",
    "Superseded",
    "LeaseHeld",
    "BackendDown",
    "ShuttingDown",
    "TimedOut",
    "InvalidConfig",
    "NeedsRestart",
    "ListenFailed",
    "LockNotAcquired",
    "gpu_lock",
]

DEFAULT_URL = "http://127.0.0.1:8000"
# Transitions answer once the services have converged: a large model may take minutes.
DEFAULT_TIMEOUT_S = 900.0


class GpuManagerError(Exception):
    """The daemon refused or failed a request, or could not be reached.

    ``status`` is the HTTP status (None when there was no answer), ``kind`` the error
    kind the daemon named (``cannot_fit``, ``busy``, ``lease_held``...; None when it
    named none),
    ``body`` the JSON error body as a dict (empty when there was none).
    """

    def __init__(
        self,
        message: str,
        status: Optional[int] = None,
        kind: Optional[str] = None,
        body: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.body: Dict[str, Any] = body or {}


class Unreachable(GpuManagerError):
    """No answer: the daemon is not running at that URL, or the network is down."""


class Unauthorized(GpuManagerError):
    """401: the request needs the API token (``token=`` or ``GPU_MANAGER_TOKEN``)."""


class BadRequest(GpuManagerError):
    """400 ``bad_request``: a malformed phase, size or query."""


class NotFound(GpuManagerError):
    """404 ``unknown_service`` / ``unknown_phase``: ``body["known"]`` lists the valid ones."""


class NoSuchClaim(NotFound):
    """404 ``no_such_claim``: that holder has no claim on the service;
    ``body["claims"]`` lists the claims there are."""


class CannotFit(GpuManagerError):
    """409 ``cannot_fit``: it does not fit even after preempting lower priorities;
    ``body["shortfall_mb"]`` says by how much, and :attr:`claims` lists the claims that
    keep it out (when claims do)."""

    @property
    def claims(self) -> List[Dict[str, Any]]:
        return list(self.body.get("claims") or [])


class Claimed(GpuManagerError):
    """409 ``claimed``: a stop of a claimed service; ``body["holders"]`` names who holds
    it. ``force=True`` ends the claims first."""


class Busy(GpuManagerError):
    """409 ``busy``: a stop or park found a service with work in flight that did not end
    within its drain timeout; nothing was touched. ``body["service"]`` names it and
    ``body["answer"]`` is what its drain probe answered. Retry later, or pass
    ``force=True`` to skip draining (its work in flight is lost)."""


class Superseded(GpuManagerError):
    """409 ``superseded``: a later request replaced this one before it converged."""


class LeaseHeld(GpuManagerError):
    """423 ``lease_held``: someone else holds the GPU lease (``body["holder"]``), such as
    a Python consumer inside ``gpu_lock``; retry when it is released."""


class BackendDown(GpuManagerError):
    """503 ``backend_down``: Redis or Docker, which the change needs, is unreachable."""


class ShuttingDown(GpuManagerError):
    """503 ``shutting_down``: the daemon is stopping; retry once it is back."""


class TimedOut(GpuManagerError):
    """504 ``timed_out``: a service was not ready in time (the message has its last log
    lines); the failed start was stopped."""


class InvalidConfig(GpuManagerError):
    """A reload of a config that does not parse or validate (422): ``error`` names
    file:line:col and the key; the config in force stays."""


class NeedsRestart(GpuManagerError):
    """A reload changing keys only a restart applies (409); ``body["keys"]`` names them."""


class ListenFailed(GpuManagerError):
    """A reload giving a proxy a listen address that cannot be bound (409); nothing changed."""


class LockNotAcquired(Exception):
    """``gpu_lock`` could not take the lock within ``blocking_timeout``."""


# The daemon's error kinds; an unknown kind (from a newer daemon) stays GpuManagerError.
_KINDS: Dict[str, Type[GpuManagerError]] = {
    "bad_request": BadRequest,
    "unknown_service": NotFound,
    "unknown_phase": NotFound,
    "no_such_claim": NoSuchClaim,
    "cannot_fit": CannotFit,
    "claimed": Claimed,
    "busy": Busy,
    "superseded": Superseded,
    "lease_held": LeaseHeld,
    "backend_down": BackendDown,
    "shutting_down": ShuttingDown,
    "timed_out": TimedOut,
    "invalid_config": InvalidConfig,
    "needs_restart": NeedsRestart,
    "listen_failed": ListenFailed,
}


def _error_from(response: requests.Response) -> GpuManagerError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"error": response.text}
    kind = body.get("kind") if isinstance(body.get("kind"), str) else None
    message = f"HTTP {response.status_code}: {body.get('error') or response.reason}"
    if response.status_code == 401:
        cls: Type[GpuManagerError] = Unauthorized
    else:
        cls = _KINDS.get(kind or "", GpuManagerError)
    return cls(message, status=response.status_code, kind=kind, body=body)


@dataclass(frozen=True)
class ProxyStatus:
    """A proxied service's demand proxy, as ``status()["services"][NAME]["proxy"]``
    carries it (a service with a ``proxy:`` key; see the README's "Demand proxy").

    ``listen`` is where its consumers connect and ``upstream`` where the service itself
    listens; ``in_flight`` counts requests forwarded and not yet answered in full,
    ``waiting`` those waiting for it to be ready, ``upgraded`` open WebSockets.
    ``demanded``: wanted because it is used, beside the phase and the pins, until
    ``demanded_until_ms`` (ms since the epoch; None while requests are under way, or when
    ``idle_ms`` is null). ``last_request_ms``: when the last request came (None: never).
    """

    listen: str
    upstream: str
    in_flight: int
    waiting: int
    demanded: bool
    demanded_until_ms: Optional[int]
    last_request_ms: Optional[int]
    upgraded: int = 0

    @classmethod
    def from_json(cls, body: Dict[str, Any]) -> "ProxyStatus":
        """From the status's ``proxy`` object; keys a newer daemon adds are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in body.items() if key in known})


class GpuManager:
    """A gpu-manager daemon's HTTP API.

    ``url`` defaults to ``GPU_MANAGER_URL``, else ``http://127.0.0.1:8000``; ``token``
    (sent as ``Authorization: Bearer`` with changes) to ``GPU_MANAGER_TOKEN``.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        session: Optional[requests.Session] = None,
    ) -> None:
        self.url = (url or os.environ.get("GPU_MANAGER_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("GPU_MANAGER_TOKEN")
        self.timeout = timeout
        self._http = session or requests.Session()
        # A local daemon is never reached through a proxy from the environment.
        self._http.trust_env = False

    def _request(
        self,
        method: str,
        path: str,
        params: Optional[Dict[str, Any]] = None,
        stream: bool = False,
    ) -> requests.Response:
        headers = {}
        if method == "POST" and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.url + path
        try:
            response = self._http.request(
                method,
                url,
                params=params,
                headers=headers,
                timeout=None if stream else self.timeout,
                stream=stream,
            )
        except requests.RequestException as error:
            raise Unreachable(
                f"cannot reach gpu-manager at {self.url}: {error}; is the daemon running "
                "(gpu-manager serve --config FILE)? Set GPU_MANAGER_URL to point at it."
            ) from error
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def _json(self, method: str, path: str, **params: Any) -> Dict[str, Any]:
        given = {k: v for k, v in params.items() if v is not None}
        result: Dict[str, Any] = self._request(method, path, params=given).json()
        return result

    def _transition(self, path: str, wait: bool, force: bool) -> Dict[str, Any]:
        # The daemon waits and drains by default: only "false" and "true" need saying.
        return self._json(
            "POST", path, wait=None if wait else "false", force="true" if force else None
        )

    def status(self) -> Dict[str, Any]:
        """``GET /gpu/status``: ``vram``, ``services.NAME.state`` (and ``.claims``, and
        ``.proxy`` for a proxied service: see :meth:`proxies`), ``lock.holder``..."""
        return self._json("GET", "/gpu/status")

    def proxies(self) -> Dict[str, ProxyStatus]:
        """The services behind a demand proxy, each with its proxy's traffic and demand
        (from ``status()``); services without ``proxy:`` are left out."""
        return {
            name: ProxyStatus.from_json(service["proxy"])
            for name, service in self.status()["services"].items()
            if service.get("proxy")
        }

    def can_fit_detail(self, mb: int, priority: Optional[int] = None) -> Dict[str, Any]:
        """``GET /gpu/can-fit``: ``fits``, ``free_mb``, ``budget_mb``, ``would_preempt``
        (what a start of ``mb`` at ``priority`` would stop) and ``reason``."""
        return self._json("GET", "/gpu/can-fit", mb=mb, priority=priority)

    def can_fit(self, mb: int, priority: Optional[int] = None) -> bool:
        """Whether ``mb`` MB fit on the GPU now, without stopping anything."""
        return bool(self.can_fit_detail(mb, priority)["fits"])

    def prepare_for_phase(
        self, phase: int, wait: bool = True, force: bool = False
    ) -> Dict[str, Any]:
        """Sets the pipeline phase; returns the transition report once the services have
        converged (with ``wait=False`` at once: poll ``status()``).

        Services with work in flight are drained first; one still busy after its drain
        timeout raises :class:`Busy` and is left untouched. ``force=True`` skips
        draining: their work in flight is lost."""
        return self._transition(f"/gpu/prepare-phase/{int(phase)}", wait, force)

    def start(self, name: str, wait: bool = True, force: bool = False) -> Dict[str, Any]:
        """Pins a service (preempting lower priorities); the transition report.
        ``force=True``: the services it preempts are not drained (work in flight is lost)."""
        return self._transition(f"/gpu/service/{name}/start", wait, force)

    def stop(self, name: str, wait: bool = True, force: bool = False) -> Dict[str, Any]:
        """Unpins a service and holds it stopped; the transition report. Raises
        :class:`Busy` when its work does not drain in time (nothing was touched);
        ``force=True`` stops it at once and its work in flight is lost."""
        return self._transition(f"/gpu/service/{name}/stop", wait, force)

    def take_claim(
        self, name: str, ttl: int, holder: str, wait: bool = True
    ) -> Dict[str, Any]:
        """``POST /gpu/service/NAME/claim``: takes or renews ``holder``'s claim for
        ``ttl`` seconds (1 to 86400); the service is started if needed and, while the
        claim lives, never stopped, parked or preempted. Raises :class:`CannotFit` (with
        :attr:`CannotFit.claims`) when it cannot be taken; nothing changes then."""
        return self._json(
            "POST", f"/gpu/service/{name}/claim", holder=holder, ttl_s=int(ttl),
            wait=None if wait else "false",
        )

    def release(self, name: str, holder: str) -> Dict[str, Any]:
        """``POST /gpu/service/NAME/release``: ends ``holder``'s claim. Raises
        :class:`NoSuchClaim` when there is none."""
        return self._json("POST", f"/gpu/service/{name}/release", holder=holder)

    def claim(self, name: str, ttl: int, holder: str) -> "ClaimSession":
        """A claim for a ``with`` block: taken on entry (raising :class:`CannotFit`),
        renewed in the background every ``ttl``/3 seconds while the block runs, released
        on the way out, exception or not. If the process dies, the claim ends by itself
        ``ttl`` seconds after its last renewal."""
        return ClaimSession(self, name, ttl, holder)

    def plan(
        self,
        phase: Optional[int] = None,
        start: Optional[str] = None,
        stop: Optional[str] = None,
    ) -> Dict[str, Any]:
        """``GET /gpu/plan``: what the daemon would do, changing nothing."""
        return self._json("GET", "/gpu/plan", phase=phase, start=start, stop=stop)

    def reload(self, keep_removed: bool = False) -> Dict[str, Any]:
        """``POST /gpu/reload``: re-reads the daemon's config file and applies what
        changed; returns the report (``generation``, ``sha256``, ``added``, ``removed``,
        ``kept_removed``, ``restarted``, ``changed``, ``globals``). ``keep_removed=True``
        leaves the processes of removed services running, unmanaged. Raises
        :class:`InvalidConfig`, :class:`NeedsRestart` or :class:`ListenFailed` when refused (nothing changed);
        ``status()["config"]`` says which config is in force."""
        return self._json("POST", "/gpu/reload", keep_removed="true" if keep_removed else None)

    def events(self) -> Iterator[Dict[str, Any]]:
        """``GET /gpu/events``: each Server-Sent Event as a dict, as it happens, until the
        caller stops iterating (or the daemon goes away). Subscribed when this returns,
        so no event of a change posted afterwards is missed."""
        return _server_sent_events(self._request("GET", "/gpu/events", stream=True))

    def services(self) -> List[str]:
        """The service names the daemon manages."""
        return sorted(self.status()["services"])


class ClaimSession:
    """What :meth:`GpuManager.claim` returns: use it in a ``with`` statement.

    ``report`` is the claim's first answer (a transition report); ``renewals`` counts the
    renewals so far and ``renewal_error`` holds the last renewal's error, if the latest
    one failed (the claim then lives until its last renewal's ``ttl`` runs out)."""

    def __init__(self, gm: GpuManager, name: str, ttl: int, holder: str) -> None:
        if int(ttl) < 3:
            raise ValueError(f"ttl={ttl}: a renewed claim needs at least 3 seconds")
        self.gm = gm
        self.name = name
        self.ttl = int(ttl)
        self.holder = holder
        self.report: Dict[str, Any] = {}
        self.renewals = 0
        self.renewal_error: Optional[GpuManagerError] = None
        self._done = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def __enter__(self) -> "ClaimSession":
        self.report = self.gm.take_claim(self.name, self.ttl, self.holder)
        self._renewer = threading.Thread(
            target=self._renew, name=f"claim-{self.name}-{self.holder}", daemon=True
        )
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._done.wait(self.ttl / 3):
            try:
                self.gm.take_claim(self.name, self.ttl, self.holder, wait=False)
                self.renewals += 1
                self.renewal_error = None
            except GpuManagerError as error:
                # The claim lives on until its last renewal's ttl: try again next time.
                self.renewal_error = error

    def __exit__(
        self,
        kind: Optional[Type[BaseException]],
        error: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self._done.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self.gm.release(self.name, self.holder)
        except NoSuchClaim:
            pass  # it expired (or was forced) meanwhile: nothing left to release


def _server_sent_events(response: requests.Response) -> Iterator[Dict[str, Any]]:
    with response:
        for line in response.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                yield json.loads(line[len("data:"):])


@contextmanager
def gpu_lock(
    redis_url: str = "redis://127.0.0.1:6379",
    key: str = "gpu_lock",
    timeout: float = 600,
    blocking_timeout: Optional[float] = None,
) -> Iterator[Any]:
    """Holds the GPU lock, the v1 way: a redis-py ``Lock`` on ``key`` that expires after
    ``timeout`` seconds unless released. gpu-manager takes the same lock (``lease.key``)
    for each transition, so while this is held its transitions wait and are refused
    (:class:`LeaseHeld`), and this waits while a transition runs. ``blocking_timeout``:
    give up after that many seconds (:class:`LockNotAcquired`); None waits for ever.

    Needs the ``redis`` extra: ``pip install 'gpu-manager-client[redis]'``.
    """
    try:
        import redis
    except ImportError as error:
        raise ImportError(
            "gpu_lock needs redis-py: pip install 'gpu-manager-client[redis]'"
        ) from error
    lock = redis.Redis.from_url(redis_url).lock(
        key, timeout=timeout, blocking_timeout=blocking_timeout
    )
    if not lock.acquire():
        raise LockNotAcquired(
            f"{key} on {redis_url} is still held after {blocking_timeout} s"
        )
    try:
        yield lock
    finally:
        lock.release()
