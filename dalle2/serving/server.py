"""Starting and stopping the HTTP server: who may bind where without a key (:func:`check_bind`), and a uvicorn server
whose shutdown drains the batch worker first (:func:`make_server`, :func:`run_server`)."""

from __future__ import annotations

import asyncio
import ipaddress
import warnings

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
# after the drain: the answers are decided, this long is left to send them before open connections are cut
SEND_GRACE_S = 5.0


def normalize_api_key(api_key: str | None) -> str | None:
    """The key, stripped; an empty or blank key is no key (None)."""
    if api_key is None:
        return None
    key = str(api_key).strip()
    return key or None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; any other address or name (it may resolve anywhere) is public."""
    h = str(host).strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, *, allow_unauthenticated: bool = False) -> str | None:
    """The api key to use (:func:`normalize_api_key`), or ValueError if serving on ``host`` without one would open
    the model to anyone who can reach it: a non-loopback bind needs a key, or ``allow_unauthenticated=True``."""
    key = normalize_api_key(api_key)
    if key is None and not is_loopback(host):
        if not allow_unauthenticated:
            raise ValueError(
                f"refusing to serve on host={host} without an api_key: anyone who can reach it could use "
                f"the model; set api_key=..., bind host=127.0.0.1, or pass allow_unauthenticated=true "
                f"to serve openly on purpose"
            )
        warnings.warn(
            f"serving on host={host} without an api_key (allow_unauthenticated=true): anyone who can reach "
            f"it can use the model",
            UserWarning,
            stacklevel=2,
        )
    return key


def make_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **uvicorn_options):
    """A ``uvicorn.Server`` for an app of :func:`~dalle2.serving.create_app`.  On shutdown (SIGINT / SIGTERM, or
    ``server.should_exit = True``) it first drains the app's batch worker: new and waiting requests get 503, the
    running batch has ``limits.shutdown_timeout_s`` to finish; then uvicorn closes the connections, giving the
    answers ``SEND_GRACE_S`` to go out.  Open connections are capped at ``limits.max_connections`` (uvicorn's
    ``limit_concurrency``: past it, 503 and the connection closed), and a connection that sends no request head
    within ``limits.read_timeout_s`` is closed (:func:`request_head_deadline`)."""
    import uvicorn

    batcher, limits = app.state.batcher, app.state.limits

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await asyncio.to_thread(batcher.drain, limits.shutdown_timeout_s)
            await super().shutdown(sockets)

    uvicorn_options.setdefault("timeout_graceful_shutdown", SEND_GRACE_S)
    uvicorn_options.setdefault("limit_concurrency", int(limits.max_connections))
    uvicorn_options.setdefault("http", request_head_deadline(limits.read_timeout_s))
    config = uvicorn.Config(app, host=host, port=int(port), log_level=log_level, lifespan="on", **uvicorn_options)
    return DrainingServer(config)


def request_head_deadline(timeout_s: float):
    """uvicorn's HTTP protocol (h11 or httptools, as uvicorn picks) that closes a connection which has not sent a
    whole request head within ``timeout_s`` of opening, or of its last response. uvicorn itself times out neither
    (only an idle keep-alive connection after a response), and ``limit_concurrency`` counts open connections: a
    client that connected and vanished, a half-open socket or a slowloris trickling header bytes would otherwise
    hold its place in ``limits.max_connections`` for good. A request being answered is never cut."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class RequestHeadDeadline(AutoHTTPProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            cycle = self.cycle  # a new request head makes a new cycle

            def expire() -> None:
                idle = self.cycle is cycle and (cycle is None or cycle.response_complete)
                if idle and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(float(timeout_s), expire)

    return RequestHeadDeadline


def run_server(app, **kwargs) -> None:
    """Serve ``app`` until SIGINT / SIGTERM (see :func:`make_server` for the arguments)."""
    make_server(app, **kwargs).run()
