"""Request/reply over the real broker: results, errors, raw JSON, and large (deflated) replies."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
import pytest

from services.bus import COMPRESS_REPLIES_FROM, Bus, RawJson, RpcError
from services.settings import Settings
from services.topology import rpc_queue


async def test_replies_small_large_raw_and_failed(settings: Settings) -> None:
    big = [{"workerId": f"w-{n}", "status": "running", "positions": []} for n in range(5000)]

    async def handle(body: dict[str, Any]) -> Any:
        if body["op"] == "big":
            return {"workers": big}
        if body["op"] == "raw":
            return RawJson(orjson.dumps({"workers": big}))
        if body["op"] == "lookup":
            raise LookupError("unknown worker 'w-x'")
        if body["op"] == "crash":
            raise RuntimeError("secret internals")
        return {"echo": body}

    server, client = Bus(settings, "rpc-server"), Bus(settings, "rpc-client")
    server.serve(rpc_queue("test"), handle)
    await server.start()
    await client.start()
    try:
        assert await client.request("test.rpc", {"op": "echo", "n": 1}) == {
            "echo": {"op": "echo", "n": 1}}
        assert len(orjson.dumps({"workers": big})) > COMPRESS_REPLIES_FROM  # sent deflated
        assert await client.request("test.rpc", {"op": "big"}) == {"workers": big}
        raw = await client.request_raw("test.rpc", {"op": "raw"})
        assert isinstance(raw, RawJson) and orjson.loads(bytes(raw)) == {"workers": big}
        # as it travelled, for callers that pass it on: deflated when large, else plain
        body, encoding = await client.request_encoded("test.rpc", {"op": "raw"})
        assert encoding == "deflate" and zlib.decompress(body) == bytes(raw)
        assert await client.request_encoded("test.rpc", {"op": "echo"}) == (
            b'{"echo":{"op":"echo"}}', None)
        with pytest.raises(RpcError, match="unknown worker 'w-x'"):
            await client.request("test.rpc", {"op": "lookup"})
        with pytest.raises(RpcError, match=r"internal error \(RuntimeError\)"):
            await client.request("test.rpc", {"op": "crash"})
    finally:
        await client.close()
        await server.close()
