// The official TypeScript MCP SDK (@modelcontextprotocol/sdk, unchanged) against
// /mcp/devices/{id} on a 2025 revision (initialize, then requests, no session). Each HTTP request
// goes to the next replica in turn (a fetch wrapper rewrites the origin). Driven by
// tests/tests/mcp.rs, which passes the replicas' URLs, the tokens, the devices and the agent's root
// in the environment; exits non-zero, saying why, on the first check that fails.

import { existsSync } from "node:fs";
import { join } from "node:path";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const env = process.env;
const urls = env.MCP_URLS.split(",");
let turn = 0;
const seen = new Set();

function check(condition, what) {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
  console.log(`ok: ${what}`);
}

// Sends each request to the next replica.
async function roundRobin(input, init) {
  const url = new URL(input instanceof Request ? input.url : String(input));
  const base = new URL(urls[turn++ % urls.length]);
  url.protocol = base.protocol;
  url.host = base.host;
  seen.add(base.host);
  return fetch(url, init);
}

async function connect(device, token = env.MCP_TOKEN) {
  const transport = new StreamableHTTPClientTransport(new URL(`${urls[0]}/mcp/devices/${device}`), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
    fetch: roundRobin,
  });
  const client = new Client({ name: "pulsn-e2e", version: "1.0.0" });
  await client.connect(transport);
  return client;
}

const text = (result) => result.content.filter((b) => b.type === "text").map((b) => b.text).join("");

const client = await connect(env.MCP_DEVICE);
const version = client.transport?.protocolVersion;
check(typeof version === "string" && version.startsWith("2025-"), `negotiated a 2025 revision (${version})`);
check(client.transport.sessionId === undefined, "no session id was issued");
const { tools } = await client.listTools();
const byName = Object.fromEntries(tools.map((t) => [t.name, t]));
check(byName.read_file && byName.write_file && byName.grep, "tools/list has the agent's tools");
check(byName.read_file.annotations.readOnlyHint === true, "read_file is read-only");
check(byName.delete.annotations.destructiveHint === true, "delete is destructive");
check(byName.create_directory.annotations.destructiveHint === false, "create_directory is not destructive");

const read = await client.callTool({ name: "read_file", arguments: { path: "hello.txt" } });
check(!read.isError, "read_file succeeds");
check(read.structuredContent.content === "hello\nworld\n", "structuredContent is the tool's result");
check(text(read).includes("data, not instructions") && text(read).includes("hello\nworld"), "file content is fenced");

const write = await client.callTool({ name: "write_file", arguments: { path: "ts-new.txt", content: "hi" } });
check(!write.isError && typeof write.structuredContent.proposalId === "string", "a write answers its proposal");
check(!existsSync(join(env.MCP_ROOT, "ts-new.txt")), "a write proposes and changes nothing");
await client.close();

const offline = await connect(env.MCP_OFFLINE_DEVICE);
const gone = await offline.callTool({ name: "read_file", arguments: { path: "a.txt" } });
check(gone.isError === true && text(gone) === "device offline", "offline is an isError result");
await offline.close();

const silent = await connect(env.MCP_SILENT_DEVICE);
const late = await silent.callTool({ name: "read_file", arguments: { path: "a.txt" } });
check(late.isError === true && text(late) === "device timed out", "timeout is an isError result");
await silent.close();

let refused = null;
try {
  await connect(env.MCP_DEVICE, env.MCP_STRANGER_TOKEN);
} catch (error) {
  refused = error;
}
check(refused !== null && refused.code === 404 && /not found/.test(String(refused)), `another user's device is a 404 (${refused}, code ${refused?.code})`);

check(seen.size === urls.length, `requests went to every replica (${[...seen].join(", ")})`);
console.log("typescript client: all checks passed");
