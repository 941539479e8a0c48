"""An asyncio service on the mesh (mesh.aio): requests, a feed, a group allreduce.

    python examples/aio_service.py

Two nodes in one asyncio program (in real use, one per process or host):
"server" answers ``model.predict`` requests with a coroutine handler and
publishes ``params.*`` updates; "client" sends 100 concurrent requests, reads
the feed with ``async for``, and both average an array with a group allreduce.
Nothing here blocks the event loop; a 1 ms ticker task shows it. Prints OK at
the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np

import mesh
import mesh.aio


async def ticker(gaps: list[float]) -> None:
    last = time.monotonic()
    while True:
        await asyncio.sleep(0.001)
        now = time.monotonic()
        gaps.append(now - last)
        last = now


async def main() -> None:
    cluster = f"aio-example-{uuid.uuid4().hex[:6]}"  # a cluster of our own
    gaps: list[float] = []
    tick = asyncio.create_task(ticker(gaps))
    async with mesh.aio.Node("server", cluster=cluster, discovery="none") as server, \
            mesh.aio.Node("client", cluster=cluster, discovery="none",
                          seeds=[server.endpoints[0]]) as client:
        await client.wait_for_peers(1, timeout=10)

        async def predict(msg: mesh.Message) -> None:
            await asyncio.sleep(0.001)  # e.g. await a model running elsewhere
            msg.respond(np.asarray(msg.array()) * 2)

        server.subscribe("model.predict", predict)
        feed = client.subscribe("params.>")
        await client.wait_for_subscribers("model.predict", 1, timeout=10)
        await server.wait_for_subscribers("params.w", 1, timeout=10)

        t0 = time.monotonic()
        replies = await asyncio.gather(*(
            client.request("model.predict", np.full(4, i, np.float32), timeout=5.0)
            for i in range(100)))
        took = time.monotonic() - t0
        assert [r.array()[0] for r in replies] == [2 * i for i in range(100)]
        print(f"100 concurrent requests in {took * 1e3:.0f} ms")

        for version in range(3):
            await server.publish("params.w", str(version), timeout=1.0)
        versions = []
        async for msg in feed:
            versions.append(bytes(msg.data).decode())
            if len(versions) == 3:
                break
        print(f"feed: {versions}")

        g_server, g_client = server.group("avg", size=2), client.group("avg", size=2)
        out = await asyncio.gather(g_server.allreduce(np.ones(8), op="mean"),
                                   g_client.allreduce(np.full(8, 3.0), op="mean"))
        print(f"allreduce mean: {out[0][:3]} ...")
        assert all(np.allclose(o, 2.0) for o in out)
        await asyncio.gather(g_server.close(), g_client.close())
    tick.cancel()
    print(f"event loop: longest gap between 1 ms ticks {max(gaps) * 1e3:.0f} ms")
    print("OK")


if __name__ == "__main__":
    asyncio.run(main())
