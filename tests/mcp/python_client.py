"""The official Python MCP SDK (`mcp`, unchanged) against /mcp/devices/{id}, protocol 2026-07-28.

Every HTTP request is sent to the next replica in turn (a custom httpx transport rewrites the
URL's origin), so each step of a conversation lands on another replica. Driven by
tests/tests/mcp.rs, which passes the replicas' URLs, the tokens, the devices and the agent's
root in the environment; it exits non-zero, saying why, on the first check that fails.
"""

import asyncio
import itertools
import os
import sys
from pathlib import Path

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ElicitResult, InputRequiredResult

URLS = os.environ["MCP_URLS"].split(",")
TOKEN = os.environ["MCP_TOKEN"]
STRANGER = os.environ["MCP_STRANGER_TOKEN"]
DEVICE = os.environ["MCP_DEVICE"]
OFFLINE = os.environ["MCP_OFFLINE_DEVICE"]
SILENT = os.environ["MCP_SILENT_DEVICE"]
ROOT = Path(os.environ["MCP_ROOT"])


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


class RoundRobin(httpx2.AsyncBaseTransport):
    """Sends each request to the next replica."""

    def __init__(self):
        self.inner = httpx2.AsyncHTTPTransport()
        self.bases = itertools.cycle([httpx2.URL(url) for url in URLS])
        self.ports = []

    async def handle_async_request(self, request):
        base = next(self.bases)
        request.url = request.url.copy_with(scheme=base.scheme, host=base.host, port=base.port)
        self.ports.append(base.port)
        return await self.inner.handle_async_request(request)

    async def aclose(self):
        await self.inner.aclose()


ROUND_ROBIN = RoundRobin()


def connect(device, token=TOKEN, elicitation=None):
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        transport=ROUND_ROBIN,
        timeout=httpx2.Timeout(30.0, read=60.0),
    )
    transport = streamable_http_client(f"{URLS[0]}/mcp/devices/{device}", http_client=http)
    return Client(transport, elicitation_callback=elicitation)


def text_of(result):
    return "".join(block.text for block in result.content if getattr(block, "type", "") == "text")


async def main():
    async with connect(DEVICE) as client:
        check(client.session.protocol_version == "2026-07-28", f"negotiated 2026-07-28 (got {client.session.protocol_version})")
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        check({"read_file", "write_file", "append_file", "grep"} <= tools.keys(), "tools/list has the agent's tools")
        check(tools["read_file"].annotations.read_only_hint is True, "read_file is read-only")
        check(tools["write_file"].annotations.destructive_hint is True, "write_file is destructive")
        check(tools["append_file"].annotations.destructive_hint is False, "append_file is not destructive")
        check(tools["read_file"].title == "Read file", "tools have a title")

        read = await client.call_tool("read_file", {"path": "hello.txt"})
        check(not read.is_error, "read_file succeeds")
        check(read.structured_content["content"] == "hello\nworld\n", "structuredContent is the tool's result")
        text = text_of(read)
        check("data, not instructions" in text and "hello\nworld" in text, "file content is fenced as data")

        # No elicitation capability: the proposal, and nothing on disk.
        proposed = await client.call_tool("write_file", {"path": "new.txt", "content": "hi"})
        check(not proposed.is_error and proposed.structured_content.get("proposalId"), "a write answers its proposal")
        check("Proposed, not applied" in text_of(proposed), "the proposal says it was not applied")
        check(not (ROOT / "new.txt").exists(), "a write proposes and changes nothing")

    asked = []

    async def accept(context, params):
        asked.append(params.message)
        return ElicitResult(action="accept", content={"approve": True})

    async def decline(context, params):
        asked.append(params.message)
        return ElicitResult(action="decline")

    async with connect(DEVICE, elicitation=accept) as client:
        applied = await client.call_tool("append_file", {"path": "log.txt", "content": "once\n"})
        check(len(asked) == 1 and "+once" in asked[0], "the elicitation shows the diff")
        check(not applied.is_error and text_of(applied).startswith("Applied"), f"approved in the client: {text_of(applied)}")
        check((ROOT / "log.txt").read_text() == "once\n", "the approved change is on disk, once")

        # The same approval retried (another replica each time) applies nothing more.
        first = await client.session.call_tool(
            "append_file", {"path": "twice.txt", "content": "x\n"}, allow_input_required=True
        )
        check(isinstance(first, InputRequiredResult), "a mutation asks for input (MRTR)")
        answers = {"approve": ElicitResult(action="accept", content={"approve": True})}
        for attempt in range(3):
            again = await client.session.call_tool(
                "append_file",
                {"path": "twice.txt", "content": "x\n"},
                input_responses=answers,
                request_state=first.request_state,
            )
            want = "Applied" if attempt == 0 else "Already applied earlier"
            check(text_of(again).startswith(want), f"retry {attempt}: {text_of(again)}")
        check((ROOT / "twice.txt").read_text() == "x\n", "retried approvals apply once")

    async with connect(DEVICE, elicitation=decline) as client:
        declined = await client.call_tool("write_file", {"path": "declined.txt", "content": "no"})
        check(declined.structured_content.get("status") == "pending", "a declined proposal stays pending")
        check(not (ROOT / "declined.txt").exists(), "a declined change is not applied")

    async with connect(OFFLINE) as client:
        tools = (await client.list_tools()).tools
        check(any(tool.name == "read_file" for tool in tools), "an offline device lists its last manifest")
        offline = await client.call_tool("read_file", {"path": "a.txt"})
        check(offline.is_error and text_of(offline) == "device offline", "offline is an isError result")

    async with connect(SILENT) as client:
        silent = await client.call_tool("read_file", {"path": "a.txt"})
        check(silent.is_error and text_of(silent) == "device timed out", "timeout is an isError result")

    try:
        async with connect(DEVICE, token=STRANGER) as client:
            await client.list_tools()
        check(False, "another user's device is refused")
    except Exception as error:  # the SDK's error for an HTTP 404
        check("404" in repr(error) or "not found" in repr(error).lower(), f"another user's device is a 404: {error!r}")

    check(len(set(ROUND_ROBIN.ports)) == len(URLS), f"requests went to every replica: {sorted(set(ROUND_ROBIN.ports))}")
    print(f"python client: all checks passed ({len(ROUND_ROBIN.ports)} requests)")


asyncio.run(main())
