"""The data-plane handler: route -> authenticate -> authorise -> stream upstream."""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from aiohttp import web
from multidict import CIMultiDict

from gateway import paths, policy
from gateway.accesslog import EXCHANGE
from gateway.auth import Authenticator, credential
from gateway.calls import Exchange, mcp_names, request_id
from gateway.config import UpstreamSettings
from gateway.cors import CorsPolicy, is_preflight, normalise_origin
from gateway.errors import ApiError, not_found
from gateway.mcp.guard import ToolGuard
from gateway.mcp.patterns import effective_patterns
from gateway.metrics import Metrics
from gateway.models import Principal, iso
from gateway.oauth.endpoints import OAuthEndpoints
from gateway.proxy import Forwarder
from gateway.sse import EndpointRewriter, EndpointTarget
from gateway.throttle import FailureThrottle, KeyRateLimiter, rate_limited
from gateway.transform import BodyCheck, BodyTransform, StreamRefused, TransformFactory, chain
from gateway.usage import CallRecorder, LastUsedRecorder

log = logging.getLogger("keystile.dataplane")

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]

_JSON = "application/json"


class DataPlane:
    """Answers every data-plane request; one instance per gateway application."""

    def __init__(
        self,
        *,
        servers: Mapping[str, UpstreamSettings],
        chat: UpstreamSettings | None,
        authenticator: Authenticator,
        forwarder: Forwarder,
        usage: LastUsedRecorder,
        calls: CallRecorder | None,
        metrics: Metrics,
        readiness: ReadinessCheck,
        throttle: FailureThrottle,
        rate_limiter: KeyRateLimiter,
        tools: ToolGuard,
        oauth: OAuthEndpoints | None = None,
        cors: CorsPolicy | None = None,
        name_calls: bool = True,
    ) -> None:
        self._servers = servers
        self._server_names = frozenset(servers)
        self._chat = chat
        self._auth = authenticator
        self._forwarder = forwarder
        self._usage = usage
        self._calls = calls
        self._metrics = metrics
        self._readiness = readiness
        self._throttle = throttle
        self._limiter = rate_limiter
        self._tools = tools
        self._oauth = oauth  # None: OAuth off (gateway.public_url unset), its routes 404
        self._cors = cors or CorsPolicy(())
        self._trusted = forwarder.trusted
        # Whether a request's MCP method and tool are read from its body: only something
        # that keeps them wants them (call records, the JSON access log).
        self._name_calls = name_calls

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        exchange = Exchange(request_id(request.headers.get("X-Request-Id")), time.time())
        request[EXCHANGE] = exchange  # for the access log
        route: paths.Route | None = None
        response: web.StreamResponse
        try:
            route = paths.route(request.raw_path)
            exchange.route = route.kind
            if route.server in self._server_names:  # a label: configured names only
                exchange.server = route.server
            origin = request.headers.get("Origin")
            if origin is not None:  # a browser: CORS (a preflight is answered here)
                exchange.cors = self._cors.answer_headers(origin, open_route=route.kind == "oauth")
            if origin is not None and is_preflight(request.method, request.headers):
                status, headers = self._cors.preflight(
                    request.headers, open_route=route.kind == "oauth"
                )
                response = web.Response(status=status, headers=headers)
            else:
                response = await self._dispatch(request, route, exchange)
        except paths.PathError as exc:
            message = f"The request path is not acceptable: {exc}."
            response = ApiError(400, "bad_path", message).response()
        except ApiError as err:
            response = self._refusal(err, route)
        except Exception:
            # A bug, not a client's doing: logged with an incident id the answer carries.
            incident = uuid.uuid4().hex[:12]
            log.exception("data-plane request failed (incident %s)", incident)
            message = f"Internal error (incident {incident})."
            response = ApiError(500, "internal_error", message).response()
        if not response.prepared:  # a streamed answer carried these in its head already
            response.headers["X-Request-Id"] = exchange.request_id
            if exchange.cors:
                response.headers.update(exchange.cors)
        duration = time.monotonic() - started
        self._metrics.request(exchange.route, exchange.server, response.status, duration)
        if exchange.principal is not None:
            self._observed(request, exchange, response, duration)
        return response

    def _refusal(self, err: ApiError, route: paths.Route | None) -> web.Response:
        """The error's answer; a 401 on an MCP route also says, while OAuth is on, where the
        server's protected-resource document is (RFC 9728 §5.1), which is how an MCP client
        finds out it may connect through OAuth."""
        response = err.response()
        mcp = route is not None and route.kind == "mcp"
        if err.status == 401 and self._oauth is not None and mcp:
            assert route is not None
            url = self._oauth.resource_metadata_url(route.server)
            challenge = response.headers.get("WWW-Authenticate", 'Bearer realm="keystile"')
            response.headers["WWW-Authenticate"] = f'{challenge}, resource_metadata="{url}"'
        return response

    def _observed(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        response: web.StreamResponse,
        duration: float,
    ) -> None:
        """A verified key's request is over: name its MCP method and tool (for the access log
        and the call record), and record the call."""
        if (
            self._name_calls
            and not exchange.named  # the tool policy's check has read them already
            and exchange.route == "mcp"
            and request.method == "POST"
        ):
            exchange.mcp_method, exchange.tool = mcp_names(
                request.headers, exchange.body, self._tools.max_inspect_bytes
            )
        exchange.body = None
        if self._calls is not None:
            sent = response.body_length if response.prepared else _body_length(response)
            self._calls.record(
                exchange.call_record(response.status, duration, sent, self._client(request))
            )

    async def _dispatch(
        self, request: web.BaseRequest, route: paths.Route, exchange: Exchange
    ) -> web.StreamResponse:
        if route.kind == "healthz":
            return _json({"status": "ok"})
        if route.kind == "readyz":
            return await self._ready()
        if route.kind == "unknown":
            raise not_found()
        client = self._client(request)
        if route.kind == "oauth":  # before any key: these routes are how a client gets one
            if self._oauth is None:
                raise not_found()
            return await self._oauth.handle(request, route, client)
        # An OAuth access token is accepted for its own server's MCP route only (gateway.auth).
        # Decision: not for /api/me either, though it only reads: it would show a client that
        # was granted one server its user's email and every other server the user may reach.
        resource = route.server if route.kind == "mcp" else None
        principal = await self._auth.authenticate(
            credential(request.headers), client, self._throttle, resource=resource
        )
        exchange.principal = principal  # verified: from here on the request is recorded
        policy.check_usable(principal, datetime.now(UTC))
        if principal.key.allowed_origins is not None:
            _require_origin(principal, request.headers.get("Origin"))
        key = principal.key
        if key.allowed_cidrs is not None:
            policy.require_address(principal, client)
        limit_headers = None
        if key.rate_limit is not None:
            allowed, limit_headers = self._limiter.take(
                key.id, key.rate_limit["requests"], key.rate_limit["per_seconds"]
            )
            if not allowed:
                raise rate_limited(limit_headers)
        self._usage.record(key.id)
        if route.kind == "me":
            response = _json(_me(principal, self._server_names))
            response.headers.update(limit_headers or {})
            return response
        answer_headers = {"X-Request-Id": exchange.request_id}
        if limit_headers:
            answer_headers.update(limit_headers)
        if exchange.cors:
            answer_headers.update(exchange.cors)
        transform: TransformFactory | None = None
        body_check = None
        guard = None
        if route.kind == "mcp":
            policy.require_server(principal, route.server, self._server_names)
            upstream = self._servers[route.server]
            url = upstream.url + route.upstream_path
            if request.method == "GET":  # a legacy SSE stream names its POST endpoint
                transform = _endpoint_rewrite(EndpointTarget(upstream.url, route.server, url))
            guard = self._tools.guard(principal, route.server)
            if guard is not None:  # only keys with a tool policy are inspected
                answers: TransformFactory
                if request.method == "POST":
                    body_check = BodyCheck(guard.limit, functools.partial(guard.check, exchange))
                    answers = functools.partial(guard.answers_to_post, exchange)
                else:
                    answers = guard.answers
                transform = chain(transform, answers) if transform else answers
        else:
            policy.require_permission(principal, "chat")
            if self._chat is None:
                raise not_found("No chat API is configured.")
            upstream = self._chat
            url = upstream.url + route.upstream_path
        if route.query:
            url = f"{url}?{route.query}"
        return await self._forwarder.forward(
            request,
            url,
            identity=_identity(principal, exchange.request_id),
            extra_headers=upstream.headers,
            transform=transform,
            body_check=body_check,
            plain_answer=guard is not None,
            label=route.server if route.kind == "mcp" else "",
            response_headers=answer_headers,
            own_cors=self._cors.configured or bool(exchange.cors),
            observed=exchange,
        )

    def _client(self, request: web.BaseRequest) -> str:
        if not self._trusted:
            return request.remote or ""
        return self._trusted.client(request.remote, request.headers.getall("X-Forwarded-For", ()))

    async def _ready(self) -> web.Response:
        checks = await self._readiness()
        ready = all(checks.values())
        return _json({"status": "ready" if ready else "not_ready", **checks}, 200 if ready else 503)


def _endpoint_rewrite(target: EndpointTarget) -> TransformFactory:
    def for_answer(status: int, headers: CIMultiDict[str]) -> BodyTransform | None:
        if not headers.get("Content-Type", "").lower().startswith("text/event-stream"):
            return None
        if headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
            # An endpoint event the gateway cannot read could send the client anywhere.
            raise StreamRefused("an encoded event stream cannot be checked")
        return EndpointRewriter(target)

    return for_answer


def _body_length(response: web.StreamResponse) -> int:
    """The size of an answer not sent yet (aiohttp's content_length works it out slower)."""
    body = response.body if isinstance(response, web.Response) else None
    return len(body) if isinstance(body, bytes) else (response.content_length or 0)


def _require_origin(principal: Principal, origin: str | None) -> None:
    """A key with allowed_origins works from those browser origins only; a request without
    an Origin (no browser page made it) is not affected."""
    allowed = principal.key.allowed_origins
    if origin is None or allowed is None:
        return
    if normalise_origin(origin) not in allowed:
        raise ApiError(403, "origin_not_allowed", "The API key may not be used from this origin.")


def _identity(principal: Principal, request_id: str) -> tuple[tuple[str, str], ...]:
    return (
        ("X-Keystile-User-Id", principal.user.id),
        ("X-Keystile-Key-Id", principal.key.id),
        ("X-Keystile-Workspace-Id", principal.workspace.id),
        ("X-Request-Id", request_id),
    )


def _me(principal: Principal, configured: frozenset[str]) -> dict[str, object]:
    key = principal.key
    servers = policy.effective_servers(principal, configured)
    user_tools = principal.user.tools if principal.user.role != "admin" else None
    return {
        "user": principal.user.to_json(),
        "workspace": principal.workspace.to_json(),
        "key": {
            "id": key.id,
            "name": key.name,
            "prefix": key.prefix,
            "servers": list(key.servers),
            "effective_servers": sorted(servers),
            "permissions": list(key.permissions),
            "expires_at": iso(key.expires_at),
            "tools": list(key.tools) if key.tools is not None else None,
            "effective_tools": effective_patterns(key.tools, user_tools, servers),
        },
    }


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type=_JSON)
