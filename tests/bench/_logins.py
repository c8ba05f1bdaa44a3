"""The NATS logins of the callout bench, in a process of their own (as agents are): reads the URL, the mode and the
logins as JSON on stdin, prints what each login took as JSON on stdout.

``burst``: every login at once, each tried again as nats-py reconnects an agent (its defaults: the answer awaited
2 s, then 2 s before the next attempt) until it is let in or ``deadline_s`` passes; the connections are held until
the last is made. ``one_by_one``: each login alone, closed before the next."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import nats
import nats.errors

from agent.aio import run

RETRY_WAIT_S = 2.0  # nats-py's reconnect_time_wait, which agents keep
CONNECT_TIMEOUT_S = 2.0  # nats-py's connect_timeout: the server's INFO, then its answer to CONNECT


async def _quiet(error: Exception) -> None:
    pass


async def _connect(url: str, user: str, password: str) -> Any:
    return await nats.connect(
        url,
        user=user,
        password=password,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=CONNECT_TIMEOUT_S,
        error_cb=_quiet,
    )


def _reason(exc: BaseException) -> str:
    said = str(exc).lower()
    if "authorization violation" in said:
        return "authorization violation"
    if "authentication timeout" in said:
        return "authentication timeout"
    if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
        return "timeout"
    return type(exc).__name__


async def burst(url: str, logins: list[list[str]], deadline_s: float) -> dict[str, Any]:
    held: list[Any] = []
    started = time.perf_counter()

    async def login(user: str, password: str) -> dict[str, Any]:
        refusals: list[str] = []
        while True:
            attempt = time.perf_counter()
            try:
                nc = await _connect(url, user, password)
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                refusals.append(_reason(exc))
                if time.perf_counter() - started > deadline_s:
                    return {"connected": None, "last": None, "refusals": refusals}
                await asyncio.sleep(RETRY_WAIT_S)
                continue
            now = time.perf_counter()
            held.append(nc)
            return {"connected": now - started, "last": now - attempt, "refusals": refusals}

    results = await asyncio.gather(*(login(user, password) for user, password in logins))
    for nc in held:
        await nc.close()
    return {"logins": results}


async def one_by_one(url: str, logins: list[list[str]]) -> dict[str, Any]:
    times = []
    for user, password in logins:
        attempt = time.perf_counter()
        nc = await _connect(url, user, password)
        times.append(time.perf_counter() - attempt)
        await nc.close()
    return {"times": times}


async def main() -> None:
    job = json.loads(sys.stdin.read())
    if job["mode"] == "burst":
        result = await burst(job["url"], job["logins"], job["deadline_s"])
    else:
        result = await one_by_one(job["url"], job["logins"])
    print(json.dumps(result))


if __name__ == "__main__":
    run(main())
