"""An in-process double of the parts of Consul's HTTP API that Caravan uses, following the documented
behaviour (developer.hashicorp.com/consul/api-docs):

- ``/v1/kv/<key>``: GET (``?recurse``, blocking with ``?index=&wait=``, ``X-Consul-Index``, 404 for a
  missing key, values base64-encoded), PUT (raw body, ``true``), DELETE (``?recurse``).
- ``/v1/agent/service/register`` (PUT JSON with TTL checks in ``Check`` or ``Checks``: each starts ``critical``
  unless its ``Status`` says otherwise), ``/v1/agent/service/deregister/<id>``, ``/v1/agent/check/pass|fail/<check
  id>`` (``service:<service id>`` for a service's one check without a ``CheckID``).
- ``/v1/catalog/services``, ``/v1/health/service/<name>`` (``?passing``), ``/v1/status/leader``.

Blocking queries on a key are answered as Consul answers them (``KVS.Get``, ``agent/consul/kvs_endpoint.go``;
``kvsGetTxn``, ``agent/consul/state/kvs.go``; ``blockingquery.Query``, ``agent/blockingquery/blockingquery.go``, in
hashicorp/consul): ``X-Consul-Index`` is the key's ``ModifyIndex``, or for a missing key the KV table's index (its
last write or delete, at least 1); the request returns once that index is past ``?index=``, or when ``wait``
(default 5 minutes, capped at 10) runs out. A write elsewhere does not release it: not for a key that exists (its
index stays), nor for one that stays missing (Consul keeps blocking while the key is not found). Writing a key's
value unchanged leaves its ``ModifyIndex`` (``kvsSetTxn``). A recursive read answers the highest ``ModifyIndex``
under the prefix, deletions there included (Consul's tombstones). ``?wait=`` is read as Go's ``time.ParseDuration``
and ``?index=`` as an unsigned integer: anything else is a 400 ``Invalid wait time`` / ``Invalid index``
(``parseWait``, ``agent/http.go``). Errors are plain text, as Consul writes them. ``down()`` makes every request fail
with a 500 "No cluster leader", as Consul does in an outage without quorum.

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

_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def go_duration(value: str) -> float | None:
    """Go's ``time.ParseDuration`` in seconds (``300ms``, ``1.5s``, ``5m0s``; a bare number only ``0``), or None for
    what it refuses (``5``, ``5sec``, ``""``)."""
    text = value[1:] if value[:1] in ("+", "-") else value
    if text == "0":
        return 0.0
    seconds, position = 0.0, 0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if part is None:
            return None
        seconds += float(part.group(1)) * _UNITS[part.group(2)]
        position = part.end()
    if not text:
        return None
    return -seconds if value.startswith("-") else seconds


def _blocking(query: dict[str, str]) -> tuple[int, float] | bytes:
    """A blocking query's index and wait in seconds (a wait of 0 or less is the default, 5 minutes; at most 10), or
    the 400 body Consul answers for a ``wait`` or ``index`` it cannot read."""
    wait = 0.0
    if query.get("wait"):
        parsed = go_duration(query["wait"])
        if parsed is None:
            return b"Invalid wait time"
        wait = parsed
    index = query.get("index") or "0"
    if not index.isascii() or not index.isdigit():
        return b"Invalid index"
    return int(index), (300.0 if wait <= 0 else min(wait, 600.0))


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
        """The raft index: every write moves it."""
        self.kv_index = 0
        """The KV table's index: the last write or delete of a key (what a read of a missing key is answered)."""
        self.least_index = 1
        """The least ``X-Consul-Index`` a KV read is answered (Consul's least is 1; some queries of older Consuls
        answered 0)."""
        self.tombstones: dict[str, int] = {}
        """Each deleted key's index of deletion (Consul's graveyard, not reaped here)."""
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
                if not isinstance(body, bytes):
                    self.send_header("Content-Type", "application/json")
                elif data:  # an error's text, as Go's server types it
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
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
                if method == "GET" and not parts.path.startswith("/v1/status/"):
                    blocking = _blocking(query)  # read with the request, before its token is looked at
                    if isinstance(blocking, bytes):
                        self._respond(400, blocking)
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
                message = (
                    f'Unknown check ID "{match.group(2)}". Ensure that the check ID is passed, not the check name.'
                )
                return 404, message.encode(), {}  # vetCheckUpdateWithAuthorizer, agent/acl.go
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
            value = base64.b64encode(body).decode() if body else None
            flags = int(query.get("flags", 0))
            if existing is not None and (existing["Value"], existing["Flags"]) == (value, flags):
                return 200, True, {}  # unchanged: its ModifyIndex stays (kvsSetTxn)
            self.kv[key] = {
                "Key": key,
                "Value": value,
                "Flags": flags,
                "CreateIndex": existing["CreateIndex"] if existing else index,
                "ModifyIndex": index,
                "LockIndex": 0,
            }
            self.kv_index = index
            return 200, True, {}
        if method == "DELETE":
            if "cas" in query:  # check-and-set: deletes the key only at ModifyIndex cas; a missing key: true
                existing = self.kv.get(key)
                if existing is None:
                    return 200, True, {}
                if int(query["cas"]) != existing["ModifyIndex"]:
                    return 200, False, {}
            doomed = [k for k in self.kv if (k.startswith(key) if recurse else k == key)]
            index = self._bump()
            for k in doomed:
                del self.kv[k]
                self.tombstones[k] = self.kv_index = index
            return 200, True, {}
        blocking = _blocking(query)
        assert not isinstance(blocking, bytes)  # refused with the request
        wanted, wait = blocking
        block = wanted > 0  # ?index=0 (or none) does not block
        deadline = time.monotonic() + wait
        with self._changed:
            read = 0
            while True:
                index, found = self._kv_read(key, recurse)
                read += 1
                if not found and not recurse and read > 1:
                    wanted = index  # still missing: Consul keeps blocking (blockingquery's ErrNotFound)
                remaining = deadline - time.monotonic()
                if not block or index > wanted or self._down or remaining <= 0:
                    break
                self._changed.wait(timeout=remaining)
        if self._down:
            return 500, b"No cluster leader", {}
        headers = {"X-Consul-Index": str(index)}
        if not found:
            return 404, b"", headers
        return 200, found, headers

    def _kv_read(self, key: str, recurse: bool) -> tuple[int, list[dict[str, Any]]]:
        """What a read of ``key`` (or of the keys under it) finds, and the index it is answered with. Lock held."""
        if not recurse:
            entry = self.kv.get(key)
            index = entry["ModifyIndex"] if entry else self.kv_index
            return max(self.least_index, index), [entry] if entry else []
        found = [v for k, v in sorted(self.kv.items()) if k.startswith(key)]
        under = [v["ModifyIndex"] for v in found] + [i for k, i in self.tombstones.items() if k.startswith(key)]
        index = max(under) if under and key else self.kv_index
        return max(self.least_index, index), found
