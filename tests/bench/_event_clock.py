"""The outside subscriber of the local model benchmark, in a process of its own: prints each event on a subject
as a JSON line with the wall-clock time it arrived. (The bench's own event loop also runs the control plane and
its API, whose work on the same task would otherwise delay the stamp.) Prints "ready" first."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import nats
from nats.aio.msg import Msg

from agent.aio import run
from agent.wire import Wire


async def main(url: str, subject: str) -> None:
    nc = await nats.connect(url)

    def on_event(msg: Msg) -> None:  # called in the read loop, as the message arrives
        arrived = time.time()
        sys.stdout.write(json.dumps({"arrived": arrived, "event": json.loads(msg.data)}) + "\n")
        sys.stdout.flush()

    await Wire.of(nc).subscribe(subject, on_event)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    run(main(sys.argv[1], sys.argv[2]))
