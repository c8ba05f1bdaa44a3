"""An in-process double of the parts of Consul's HTTP API that Caravan uses, following the documented
behaviour (developer.hashicorp.com/consul/api-docs):

- ``/v1/kv/<key>``: GET (``?recurse``, blocking with ``?index=&wait=``, ``X-Consul-Index``, 404 for a
  missing key, values base64-encoded), PUT (raw body, ``true``), DELETE (``?recurse``).
- ``/v1/agent/service/register`` (PUT JSON with TTL checks in ``Check`` or ``Checks``: each starts ``critical``
  unless its ``Status`` says otherwise), ``/v1/agent/service/deregister/<id>``, ``/v1/agent/check/pass|fail/<check
  id>`` (``service:<service id>`` for a service's one check without a ``CheckID``).
- ``/v1/catalog/services``, ``/v1/health/service/<name>`` (``?passing``), ``/v1/status/leader``.

Blocking queries follow the documented contract: the request returns when the index moves past the one
given or when ``wait`` (default 5 minutes, capped at 10) runs out, whichever is first; spurious wake-ups
are allowed. ``down()`` makes every request fail with a 500 "No cluster leader", as Consul does in an
outage without quorum.

With ``acl_token`` set, ACLs are on with the default policy ``deny``: a request without that token
(``X-Consul-Token``, ``Authorization: Bearer`` or ``?token=``) gets 403, "ACL not found" for a token Consul does
not know, "Permission denied" for none (the anonymous token may do nothing); ``/v1/status/*`` needs none.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["ConsulDouble", "nomad_service"]

_DURATION = re.compile(r"^(\d+)(ms|s|m)?$")


def _wait_seconds(value: str | None) -> float:
    if not value:
        return 300.0
    match = _DURATION.match(value)
    if not match:
        return 300.0
    number, unit = int(match.group(1)), match.group(2) or "s"
    return min(600.0, number / 1000 if unit == "ms" else number * 60 if unit == "m" else float(number))


def nomad_service(alloc_id: str, name: str, port: int, meta: dict[str, str]) -> dict[str, Any]:
    """The registration a Nomad client sends Consul (``PUT /v1/agent/service/register``) for an allocation of a job
    whose group ``agent`` has the service ``name`` on the port labelled ``health`` (provider ``consul``): its ID is
    ``_nomad-task-<alloc id>-group-<group>-<service>-<port label>`` (``MakeAllocServiceID`` in hashicorp/nomad),
    its meta the service block's with ``external-source: nomad``. Its check passes."""
    return {
        "ID": f"_nomad-task-{alloc_id}-group-agent-{name}-health",
        "Name": name,
        "Tags": ["caravan", "agent"],
        "Address": "127.0.0.1",
        "Port": port,
        "Meta": {**meta, "external-source": "nomad"},
        "Check": {"TTL": "30s", "Status": "passing"},
    }


class ConsulDouble:
    def __init__(self, acl_token: str | None = None) -> None:
        self.acl_token = acl_token
        self.kv: dict[str, dict[str, Any]] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.index = 1
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        """Each request's method, path and query."""
        self._changed = threading.Condition()
        self._down = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> ConsulDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _respond(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                double.requests.append((method, parts.path, query))
                if double._down:
                    self._respond(500, b"No cluster leader")
                    return
                denied = double.denied(parts.path, self.headers, query)
                if denied is not None:
                    self._respond(403, denied)
                    return
                status, payload, headers = double.handle(method, unquote(parts.path), query, body)
                self._respond(status, payload, headers)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            with self._changed:
                self._changed.notify_all()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @contextmanager
    def down(self) -> Iterator[None]:
        """Every request fails (500 No cluster leader) inside the block; blocked queries are woken."""
        self._down = True
        with self._changed:
            self._changed.notify_all()
        try:
            yield
        finally:
            self._down = False

    def denied(self, path: str, headers: Any, query: dict[str, str]) -> bytes | None:
        """Why Consul refuses the request under its ACLs, or None."""
        if self.acl_token is None or path.startswith("/v1/status/"):
            return None
        authorization = headers.get("Authorization", "")
        bearer = authorization[len("Bearer ") :] if authorization.startswith("Bearer ") else ""
        token = headers.get("X-Consul-Token") or bearer or query.get("token")
        if token == self.acl_token:
            return None
        return b"ACL not found" if token else b"Permission denied"

    def _bump(self) -> int:
        with self._changed:
            self.index += 1
            self._changed.notify_all()
            return self.index

    def handle(self, method: str, path: str, query: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        if path == "/v1/status/leader":
            return 200, "127.0.0.1:8300", {}
        if path.startswith("/v1/kv/"):
            return self._kv(method, path[len("/v1/kv/") :], query, body)
        if path == "/v1/agent/service/register" and method == "PUT":
            # Consul decodes these bodies case-insensitively (py-consul sends lowercase keys)
            raw = {k.lower(): v for k, v in json.loads(body or b"{}").items()}
            if not raw.get("name"):
                return 400, b"Missing service name", {}
            spec = {
                "Name": raw["name"],
                "ID": raw.get("id") or raw["name"],
                "Address": raw.get("address", ""),
                "Port": raw.get("port", 0),
                "Tags": raw.get("tags") or [],
                "Meta": raw.get("meta") or {},
            }
            service_id = spec["ID"]
            self.services[service_id] = spec
            # `Check` and `Checks` (py-consul sends its one check in `Checks`) make one list; a check without a
            # CheckID is `service:<service id>`, with `:<position>` when the list holds more than one
            checks = ([raw["check"]] if raw.get("check") else []) + list(raw.get("checks") or [])
            for position, given in enumerate(checks, 1):
                check = {k.lower(): v for k, v in given.items()}
                check_id = check.get("checkid") or check.get("id") or f"service:{service_id}"
                if len(checks) > 1 and not (check.get("checkid") or check.get("id")):
                    check_id += f":{position}"
                self.checks[check_id] = {
                    "ServiceID": service_id,
                    "Status": check.get("status") or "critical",  # a check's initial status, critical unless given
                    "Output": "",
                    "TTL": check.get("ttl"),
                }
            self._bump()
            return 200, b"", {}
        if path.startswith("/v1/agent/service/deregister/") and method == "PUT":
            service_id = path.rsplit("/", 1)[1]
            self.services.pop(service_id, None)
            self._drop_checks(service_id)
            self._bump()
            return 200, b"", {}
        match = re.match(r"^/v1/agent/check/(pass|fail|warn)/(.+)$", path)
        if match and method == "PUT":
            check = self.checks.get(match.group(2))
            if check is None:
                return 404, f'Unknown check ID "{match.group(2)}"'.encode(), {}
            check["Status"] = {"pass": "passing", "fail": "critical", "warn": "warning"}[match.group(1)]
            check["Output"] = query.get("note", "")
            self._bump()
            return 200, b"", {}
        if path == "/v1/catalog/services":
            names: dict[str, list[str]] = {}
            for spec in self.services.values():
                names.setdefault(spec["Name"], sorted(set(spec.get("Tags") or [])))
            return 200, names, {"X-Consul-Index": str(self.index)}
        if path.startswith("/v1/health/service/"):
            return self._health(path.rsplit("/", 1)[1], query)
        return 404, b"Invalid URL path", {}

    def _drop_checks(self, service_id: str) -> None:
        for check_id in [c for c, check in self.checks.items() if check["ServiceID"] == service_id]:
            del self.checks[check_id]

    def _health(self, name: str, query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        entries = []
        for service_id, spec in self.services.items():
            if spec["Name"] != name:
                continue
            checks = [
                {"CheckID": check_id, "Status": check["Status"], "Output": check["Output"]}
                for check_id, check in self.checks.items()
                if check["ServiceID"] == service_id
            ]
            passing_only = "passing" in query and query["passing"] not in ("false", "0")
            if passing_only and any(c["Status"] != "passing" for c in checks):
                continue
            entries.append(
                {
                    "Node": {"Node": "double", "Address": "127.0.0.1"},
                    "Service": {
                        "ID": service_id,
                        "Service": spec["Name"],
                        "Address": spec.get("Address", ""),
                        "Port": spec.get("Port", 0),
                        "Tags": spec.get("Tags") or [],
                        "Meta": spec.get("Meta") or {},
                    },
                    "Checks": checks,
                }
            )
        return 200, entries, {"X-Consul-Index": str(self.index)}

    def _kv(self, method: str, key: str, query: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        recurse = "recurse" in query
        if method == "PUT":
            existing = self.kv.get(key)
            if "cas" in query and int(query["cas"]) != (existing["ModifyIndex"] if existing else 0):
                return 200, False, {}  # check-and-set: 0 writes only a new key, n only over ModifyIndex n
            index = self._bump()
            self.kv[key] = {
                "Key": key,
                "Value": base64.b64encode(body).decode() if body else None,
                "Flags": int(query.get("flags", 0)),
                "CreateIndex": existing["CreateIndex"] if existing else index,
                "ModifyIndex": index,
                "LockIndex": 0,
            }
            return 200, True, {}
        if method == "DELETE":
            if "cas" in query:  # check-and-set: deletes the key only at ModifyIndex cas; a missing key: true
                existing = self.kv.get(key)
                if existing is None:
                    return 200, True, {}
                if int(query["cas"]) != existing["ModifyIndex"]:
                    return 200, False, {}
            doomed = [k for k in self.kv if (k.startswith(key) if recurse else k == key)]
            for k in doomed:
                del self.kv[k]
            self._bump()
            return 200, True, {}
        wanted = int(query.get("index") or 0)
        deadline = time.monotonic() + _wait_seconds(query.get("wait"))
        with self._changed:
            while wanted and self.index <= wanted and not self._down:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(timeout=remaining)
        if self._down:
            return 500, b"No cluster leader", {}
        found = [v for k, v in sorted(self.kv.items()) if (k.startswith(key) if recurse else k == key)]
        headers = {"X-Consul-Index": str(self.index)}
        if not found:
            return 404, b"", headers
        return 200, found, headers
