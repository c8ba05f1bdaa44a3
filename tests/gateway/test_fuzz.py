"""Property-based fuzzing of every route with schemathesis, against the app's own OpenAPI schema, as a customer and
as an admin: no 5xx, and every response matches the schema. Bounded: a few examples per operation."""

from __future__ import annotations

import asyncio

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests.conftest import Api
from tests.gateway.test_quotas import set_quota

EXAMPLES = 15


def fuzz(base: str, headers: dict[str, str], examples: int) -> list[str]:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=base,
                headers=headers,
                timeout=30,
                checks=[not_a_server_error, response_schema_conformance, status_code_conformance],
            )

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    return failures


@pytest.mark.parametrize("role", ["customer", "admin"])
async def test_no_route_answers_5xx_or_off_schema(api: Api, role: str) -> None:
    customer_id, headers = await api.new_customer("fuzzed")
    await set_quota(api, customer_id, max_agents=2, max_concurrent_tasks=2)  # what fuzzing creates stays small
    if role == "admin":
        headers = await api.admin()
    failures = await asyncio.to_thread(fuzz, api.base, headers, EXAMPLES)
    assert not failures, "\n\n".join(failures)
