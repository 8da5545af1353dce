"""Drives a Multiplex daemon through the official MCP Python SDK, as a real client would.

Run by tests/mcp/main.rs against a daemon with simulated nodes:

    client_check.py http URL [--mode legacy|auto]
    client_check.py stdio MULTIPLEX_BINARY DAEMON_URL [--mode legacy|auto]

Prints one line per check and exits non-zero on the first failure.
"""

import argparse
import json
import sys
import time

import anyio
from mcp import Client, MCPError, StdioServerParameters

DEADLINE_S = 60

INVERT = {
    "name": "mcp invert",
    "nodes": [
        {
            "id": "invert",
            "type": "comfyui",
            "data": {
                "output": "image",
                "workflow": {
                    "1": {
                        "class_type": "EmptyImage",
                        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
                    },
                    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                    "3": {
                        "class_type": "SaveImage",
                        "inputs": {"images": ["2", 0], "filename_prefix": "mcp"},
                    },
                },
            },
        }
    ],
    "edges": [],
}

TOOLS = {
    "submit_workflow",
    "get_workflow_status",
    "cancel_workflow",
    "allocate_gpu_resources",
    "release_lease",
    "stream_activity",
    "list_nodes",
}
RESOURCES = {"multiplex://cluster/status", "multiplex://templates", "multiplex://capabilities"}
FINAL = {"succeeded", "failed", "cancelled"}


def check(condition, what, detail=""):
    if not condition:
        raise SystemExit(f"FAILED: {what} {detail}")
    print(f"ok: {what}", flush=True)


def text_of(result):
    return "\n".join(block.text for block in result.content if getattr(block, "text", None))


async def poll_until_done(client, run_id):
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = await client.call_tool("get_workflow_status", {"id": run_id})
        check(not result.is_error, "get_workflow_status answers", text_of(result))
        run = result.structured_content
        if run["state"] in FINAL:
            return run
        if time.monotonic() > deadline:
            raise SystemExit(f"FAILED: run {run_id} never ended: {run}")
        await anyio.sleep(0.05)


async def scenario(server, mode, legacy):
    updates = []

    async def on_message(message):
        root = getattr(message, "root", message)
        if getattr(root, "method", None) == "notifications/resources/updated":
            updates.append(root.params.uri)

    async with Client(server, mode=mode, message_handler=on_message) as client:
        check(True, f"connected ({mode})")

        tools = await client.list_tools()
        names = {tool.name for tool in tools.tools}
        check(TOOLS <= names, "tools/list has every tool", names)
        submit = next(tool for tool in tools.tools if tool.name == "submit_workflow")
        props = submit.input_schema["properties"]
        check({"workflow", "template", "parameters", "lease"} <= set(props), "submit schema")

        resources = await client.list_resources()
        uris = {str(resource.uri) for resource in resources.resources}
        check(RESOURCES <= uris, "resources/list has every resource", uris)
        templates = await client.list_resource_templates()
        check(
            any(t.uri_template == "multiplex://runs/{id}" for t in templates.resource_templates),
            "resources/templates/list has the run template",
        )

        if legacy:
            await client.subscribe_resource("multiplex://cluster/status")
            check(True, "resources/subscribe accepted")

        progress = []

        async def on_progress(value, total, message):
            progress.append((value, total, message))

        result = await client.call_tool(
            "submit_workflow", {"workflow": INVERT}, progress_callback=on_progress
        )
        check(not result.is_error, "submit_workflow with progress", text_of(result))
        followed = result.structured_content
        check(followed["state"] == "succeeded", "the followed run succeeded", followed)
        check(len(progress) > 0, "progress notifications arrived", progress)
        values = [value for value, _, _ in progress]
        check(values == sorted(values), "progress never goes back", values)

        result = await client.call_tool("submit_workflow", {"workflow": INVERT})
        check(not result.is_error, "submit_workflow", text_of(result))
        run_id = result.structured_content["id"]
        check(result.structured_content["state"] in {"queued", "running"}, "initial state")
        run = await poll_until_done(client, run_id)
        check(run["state"] == "succeeded", "polled run succeeded", run)
        artifacts = run["steps"][0]["artifacts"]
        check(artifacts and artifacts[0]["href"].startswith("http"), "artifact links", run)

        for uri in sorted(RESOURCES) + [f"multiplex://runs/{run_id}"]:
            read = await client.read_resource(uri)
            body = json.loads(read.contents[0].text)
            check(isinstance(body, dict) and body, f"read {uri}")
        try:
            await client.read_resource("multiplex://runs/no-such-run")
            raise SystemExit("FAILED: an unknown run was read")
        except MCPError as err:
            check("no run with id" in str(err), "unknown run resource refused", err)

        try:
            await client.call_tool("no_such_tool", {})
            raise SystemExit("FAILED: an unknown tool was called")
        except MCPError as err:
            check("unknown tool" in str(err), "unknown tool refused", err)

        result = await client.call_tool("submit_workflow", {"workflow": "not a document"})
        check(result.is_error and "invalid arguments" in text_of(result), "bad arguments")
        result = await client.call_tool("get_workflow_status", {})
        check(result.is_error and "missing field `id`" in text_of(result), "missing id")
        bad = {"name": "bad", "nodes": [{"id": "a", "type": "nope"}, {"id": "a",
               "type": "image", "data": {}}], "edges": [{"id": "e", "source": "a",
               "target": "ghost"}]}
        result = await client.call_tool("submit_workflow", {"workflow": bad})
        text = text_of(result)
        issues = result.structured_content.get("issues", [])
        check(result.is_error and len(issues) >= 3, "every validation issue", text)
        check("the workflow is invalid" in text and "unknown_type" in text, "REST message")

        lease = await client.call_tool(
            "allocate_gpu_resources",
            {"capability": "image", "vram_mb": 16000, "count": 1, "duration_seconds": 60},
        )
        check(not lease.is_error, "allocate_gpu_resources", text_of(lease))
        lease = lease.structured_content
        result = await client.call_tool(
            "submit_workflow",
            {"template": "flux-txt2img", "parameters": {"prompt": "a lighthouse",
                                                        "width": 256, "height": 256,
                                                        "steps": 2},
             "lease": lease["id"]},
        )
        check(not result.is_error, "template submit under a lease", text_of(result))
        run = await poll_until_done(client, result.structured_content["id"])
        check(run["state"] == "succeeded", "leased run succeeded", run)
        check(run["steps"][0]["node"] in lease["nodes"], "ran on the leased node", run)
        released = await client.call_tool("release_lease", {"id": lease["id"]})
        check(not released.is_error, "release_lease", text_of(released))
        again = await client.call_tool("release_lease", {"id": lease["id"]})
        check(again.is_error and "no lease with id" in text_of(again), "released once")

        activity = await client.call_tool("stream_activity", {"cursor": 0, "run_id": run_id})
        body = activity.structured_content
        check(body["events"] and body["next_cursor"] > 0, "stream_activity", body)
        later = await client.call_tool("stream_activity", {"cursor": body["next_cursor"],
                                                           "run_id": run_id})
        check(later.structured_content["events"] == [], "cursor moves past what was read")

        nodes = await client.call_tool("list_nodes", {})
        check(len(nodes.structured_content["nodes"]) > 0, "list_nodes")

        if legacy:
            with anyio.fail_after(DEADLINE_S):
                while "multiplex://cluster/status" not in updates:
                    await anyio.sleep(0.05)
            check(True, "notifications/resources/updated arrived")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["http", "stdio"])
    parser.add_argument("target")
    parser.add_argument("daemon", nargs="?")
    parser.add_argument("--mode", default="legacy")
    args = parser.parse_args()
    if args.transport == "http":
        server = args.target
    else:
        server = StdioServerParameters(command=args.target, args=["mcp", "--url", args.daemon])
    anyio.run(scenario, server, args.mode, args.mode == "legacy")
    print("MCP client check passed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
