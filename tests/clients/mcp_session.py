#!/usr/bin/env python3
"""Drives `cluster mcp` with the PyPI MCP client (the `mcp` package), as an assistant's
host would: initialize, list the tools, dry-run an update, run it, follow it to its end.

usage: mcp_session.py CLUSTER_BIN NODE_ADDR DIST
Credentials come from CLUSTER_TLS. Prints one JSON object: what each step returned.
"""
import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def payload(result):
    text = "".join(c.text for c in result.content if getattr(c, "type", "") == "text")
    return {"is_error": bool(result.is_error), "value": json.loads(text)}


async def main():
    binary, node, dist = sys.argv[1:4]
    env = {"CLUSTER_TLS": os.environ["CLUSTER_TLS"]}
    server = StdioServerParameters(command=binary, args=["mcp", "--node", node], env=env)
    out = {}
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out["server"] = init.server_info.name
            tools = await session.list_tools()
            out["tools"] = {t.name: t.input_schema for t in tools.tools}
            out["status"] = payload(await session.call_tool("cluster_status", {}))
            out["bad_dist"] = payload(
                await session.call_tool("initiate_rolling_update", {"dist": "/nonexistent", "dryRun": True})
            )
            out["dry_run"] = payload(
                await session.call_tool("initiate_rolling_update", {"dist": dist, "dryRun": True})
            )
            out["canary_dry_run"] = payload(
                await session.call_tool(
                    "initiate_rolling_update",
                    {"dist": dist, "dryRun": True, "steps": "1,100%", "stepPause": "1m",
                     "maxFailures": "10%"},
                )
            )
            out["bad_budget"] = payload(
                await session.call_tool(
                    "initiate_rolling_update", {"dist": dist, "dryRun": True, "maxFailures": "lots"}
                )
            )
            out["update"] = payload(
                await session.call_tool(
                    "initiate_rolling_update",
                    {"dist": dist, "stabilizeMs": 500, "soakMs": 0, "healthDeadlineMs": 30000},
                )
            )
            # The node this server talks to restarts during the rollout: a failed call
            # is retried, as an assistant would.
            phases, failed_calls = set(), 0
            for _ in range(1200):
                status = payload(await session.call_tool("rollout_status", {}))
                if status["is_error"]:
                    failed_calls += 1
                elif not status["value"].get("active"):
                    break
                else:
                    phases.update(status["value"]["active"]["phases"].values())
                await asyncio.sleep(0.1)
            out["phases_seen"] = sorted(phases)
            out["failed_calls"] = failed_calls
            out["history"] = payload(await session.call_tool("rollout_history", {"limit": 5}))
    print(json.dumps(out))


asyncio.run(main())
