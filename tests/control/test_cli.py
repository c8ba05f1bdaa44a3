"""The `caravan killswitch` verbs, against a running gateway."""

from __future__ import annotations

import asyncio

import pytest

from control.cli import main
from tests.conftest import ADMIN_KEY, Api


async def run_cli(*argv: str) -> int:
    def call() -> int:
        try:
            main(list(argv))
        except SystemExit as exc:
            return int(exc.code) if isinstance(exc.code, int) else 1
        return 0

    return await asyncio.to_thread(call)


async def test_killswitch_engage_status_release(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--url", api.base, "--api-key", ADMIN_KEY]
    assert await run_cli("killswitch", "engage", "--reason", "drill", *common) == 0
    assert "killswitch engaged (all" in capsys.readouterr().out
    assert await run_cli("killswitch", "status", *common) == 0
    status = capsys.readouterr().out
    assert "ENGAGED all" in status and "drill" in status
    assert await run_cli("killswitch", "release", *common) == 0
    assert await run_cli("killswitch", "status", *common) == 0
    assert "no killswitch engaged" in capsys.readouterr().out


async def test_killswitch_cli_explains_failures(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("killswitch", "engage", "--url", api.base, "--api-key", "wrong-key-0123456789") == 1
    assert (
        await run_cli(
            "killswitch", "engage", "--customer", "cu-000000000000", "--url", api.base, "--api-key", ADMIN_KEY
        )
        == 1
    )
