"""One raw NATS subscriber process for the killswitch baseline: answers every ping with an ack."""

from __future__ import annotations

import asyncio
import sys

import nats

from agent.aio import run


async def main(url: str, index: str) -> None:
    nc = await nats.connect(url)

    async def pong(msg: nats.aio.msg.Msg) -> None:
        await nc.publish("bench.ack", index.encode())

    await nc.subscribe("bench.ping", cb=pong)
    await nc.flush()
    await nc.publish("bench.ready", index.encode())
    await asyncio.Event().wait()


if __name__ == "__main__":
    run(main(sys.argv[1], sys.argv[2]))
