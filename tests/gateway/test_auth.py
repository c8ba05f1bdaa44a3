"""Authentication: API keys for short-lived JWTs; roles on routes; tampered tokens refused."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import httpx
import jwt

from control.models import ApiKey, Role
from control.platform import ControlPlane
from control.services.audit import AuditQuery
from control.settings import Settings
from gateway.app import create_app
from tests.conftest import ADMIN_KEY, Api
from tests.gateway.test_metrics import scrape, value
from tests.gateway.test_tasks_api import assert_ws_refused
from tests.support.helpers import serve_app


async def test_api_key_exchange_and_roles(api: Api) -> None:
    _customer_id, headers = await api.new_customer()
    assert (await api.client.get("/v1/agents", headers=headers)).status_code == 200
    assert (await api.client.get("/v1/admin/customers", headers=headers)).status_code == 403
    assert (await api.client.post("/v1/admin/customers", json={"name": "x"}, headers=headers)).status_code == 403
    admin = await api.admin()
    assert (await api.client.get("/v1/admin/customers", headers=admin)).status_code == 200


async def test_bad_keys_and_missing_tokens_are_401(api: Api) -> None:
    for key in ("", "nope", "cvn_00000000_" + "x" * 43, "x" * 600):
        response = await api.client.post("/v1/auth/token", json={"api_key": key})
        assert response.status_code in (401, 422), key
        assert "error" in response.json()
    response = await api.client.get("/v1/agents")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["message"] == (
        "missing token: send the access_token of POST /v1/auth/token as the bearer"
    )
    ws = api.base.replace("http", "ws") + "/v1/tasks/tk-000000000000/ws"
    assert await assert_ws_refused(ws, 401, "unauthorized") == (  # a browser sets no header on a WebSocket
        "missing token: send the access_token of POST /v1/auth/token as Authorization: Bearer or ?token="
    )
    created = await api.client.post("/v1/admin/customers", json={"name": "keyed"}, headers=await api.admin())
    key = created.json()["api_key"]
    as_bearer = await api.client.get("/v1/agents", headers={"Authorization": f"Bearer {key}"})
    assert as_bearer.status_code == 401  # the key itself is no bearer: the message says what to do with it
    assert "this is an API key, not a token" in as_bearer.text and key not in as_bearer.text


async def test_a_request_with_two_authorization_headers_is_refused_whichever_is_valid(api: Api) -> None:
    """The header cannot be repeated (RFC 9110): a proxy that adds one of its own in front of the client's would
    have the API read the first. Neither is taken, each order refused alike; and the refusal counts as a failed
    authentication."""
    _customer_id, headers = await api.new_customer()
    admin = await api.admin()
    before = len(await api.control.audit.query(AuditQuery(action="auth.denied")))
    for pair in ((headers, admin), (admin, headers), (headers, headers)):
        both = [("Authorization", each["Authorization"]) for each in pair]
        response = await api.client.get("/v1/agents", headers=both)
        assert response.status_code == 401, pair
        assert response.json()["error"]["message"].startswith("send one Authorization header")
    assert len(await api.control.audit.query(AuditQuery(action="auth.denied"))) == before + 3
    assert (await api.client.get("/v1/agents", headers=headers)).status_code == 200


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_tampered_expired_and_unsigned_tokens_are_refused(api: Api) -> None:
    _customer_id, headers = await api.new_customer()
    token = headers["Authorization"].split()[1]
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged_role = f"{header}.{_b64({**claims, 'role': 'admin', 'cid': None})}.{signature}"
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({**claims, 'role': 'admin'})}."
    expired = jwt.encode({**claims, "exp": int(time.time()) - 10}, api.control.settings.jwt_secret or "", "HS256")
    wrong_key = jwt.encode(claims, "not-the-secret-" + "y" * 32, "HS256")
    for bad in (forged_role, unsigned, expired, wrong_key, "garbage"):
        response = await api.client.get("/v1/admin/customers", headers={"Authorization": f"Bearer {bad}"})
        assert response.status_code == 401, bad
        assert "POST /v1/auth/token" in response.json()["error"]["message"]
        assert ("token expired" in response.json()["error"]["message"]) == (bad is expired)
        response = await api.client.get("/v1/agents", headers={"Authorization": f"Bearer {bad}"})
        assert response.status_code == 401, bad


async def test_probes_and_docs(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["scheduler"] == "local"
    for probe in ("/healthz", "/readyz"):  # load balancers probe with HEAD too
        head = await api.client.head(probe)
        assert (head.status_code, head.content) == (200, b"")
    schema = (await api.client.get("/openapi.json")).json()
    for path in ("/v1/auth/token", "/v1/agents", "/v1/agents/{agent_id}/job", "/v1/tasks/{task_id}/events"):
        assert path in schema["paths"]
    assert (await api.client.get("/docs")).status_code == 200


async def test_head_is_answered_on_every_get_route_as_the_get_is_with_no_body(api: Api) -> None:
    """A general-purpose server supports GET and HEAD (RFC 9110): curl -I, link checkers and monitors ask with HEAD.
    Its answer is the GET's status and headers (the body's length among them), refusals included."""
    _, headers = await api.new_customer("probed")
    _, before = await scrape(api)
    for path, auth in (("/v1/agents", headers), ("/v1/usage", headers), ("/docs", {}), ("/openapi.json", {})):
        get = await api.client.get(path, headers=auth)
        head = await api.client.head(path, headers=auth)
        assert (get.status_code, head.status_code, head.content) == (200, 200, b""), path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert head.headers["content-length"] == str(len(get.content)) != "0", path
    refused = (
        ("/v1/agents", {}, 401),  # no token
        ("/v1/admin/customers", headers, 403),  # a customer's token on an admin route
        ("/v1/agents/ag-000000000000", headers, 404),
        ("/v1/no-such-route", headers, 404),
        ("/v1/auth/token", {}, 405),  # POST only
    )
    for path, auth, status in refused:
        get = await api.client.get(path, headers=auth)
        head = await api.client.head(path, headers=auth)
        assert (get.status_code, head.status_code, head.content) == (status, status, b""), path
        assert head.headers.get("allow") == get.headers.get("allow"), path
    _, after = await scrape(api)
    for route, status in (("/v1/agents", "200"), ("/v1/agents", "401"), ("/v1/agents/{agent_id}", "404")):
        counted = value(after, "caravan_http_requests_total", method="HEAD", route=route, status=status)
        assert counted - value(before, "caravan_http_requests_total", method="HEAD", route=route, status=status) == 1


async def test_a_chosen_admin_keys_prefix_shows_none_of_it_and_survives_a_restart(api: Api, settings: Settings) -> None:
    admin = await api.admin()  # a login: audited with the key's prefix as its actor
    keys = (await api.client.get("/v1/admin/keys", headers=admin)).json()
    (seeded,) = [k["prefix"] for k in keys if k["role"] == "admin"]
    audit = (await api.client.get("/v1/admin/audit", headers=admin)).text
    assert f"admin:{seeded}" in audit
    for shown in (json.dumps(keys), audit):
        assert ADMIN_KEY[:6] not in shown

    async def restart_with_stored_prefix(prefix: str) -> str:
        """The prefix the seeded key has after a start of the control plane that found ``prefix`` stored."""
        stored, key_hash = api.control.jet.kv["keys"], hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
        record = ApiKey.model_validate_json((await stored.get(key_hash)).value or b"")
        await stored.put(key_hash, record.model_copy(update={"prefix": prefix}).model_dump_json().encode())
        async with ControlPlane(settings) as again:
            (key,) = [k for k in await again.auth.list_keys() if k.role is Role.ADMIN]
        return key.prefix

    assert await restart_with_stored_prefix(seeded) == seeded
    migrated = await restart_with_stored_prefix(ADMIN_KEY[:12])  # as an earlier version stored it
    assert migrated != ADMIN_KEY[:12] and ADMIN_KEY[:6] not in migrated


async def test_the_websocket_refuses_as_every_route_does_audited_and_counted_against_the_address(api: Api) -> None:
    strict = api.control.settings.model_copy(update={"rate_limit_scale": 0.25})  # failures: burst 5, 1 per 4 s
    path = "/v1/tasks/tk-000000000000/ws"
    async with serve_app(create_app(strict, api.control)) as base, httpx.AsyncClient(base_url=base) as client:
        url = base.replace("http", "ws") + path
        for attempt in (url, f"{url}?token=forged", f"{url}?token=garbage", url, f"{url}?token=x"):
            await assert_ws_refused(attempt, 401, "unauthorized")
        throttled = await client.get("/v1/agents", headers={"Authorization": "Bearer forged"})
        assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "rate_limited"
        await assert_ws_refused(f"{url}?token=forged", 429, "rate_limited")
    response = await api.client.get("/v1/admin/audit", params={"action": "auth.denied"}, headers=await api.admin())
    denied = [r for r in response.json() if r["details"]["path"] == path]
    assert [r["result"] for r in denied] == ["denied"] * 5
