// The TypeScript MCP SDK client (the one inside Claude Desktop, Claude Code, Cursor, VS Code and
// the MCP Inspector) driving apm, for tests/test_real_clients.py.
//
// stdin: one JSON object {transport: "stdio"|"http", command, args, env, url, calls: [{tool,
// arguments}]}. The session token is read from this process's APM_EPHEMERAL_ID, never from
// argv: stdio passes it to the spawned shim's env, http sends it as `Authorization: Bearer`.
// stdout: one JSON object {tools: [names], calls: [{tool, result} | {tool, error: {code,
// message}}]}. Like a real client it lists the tools first, so the SDK knows each tool's
// outputSchema and validates results against it.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const spec = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const token = process.env.APM_EPHEMERAL_ID ?? "";

let transport;
if (spec.transport === "http") {
  transport = new StreamableHTTPClientTransport(new URL(spec.url), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
} else {
  transport = new StdioClientTransport({
    command: spec.command,
    args: spec.args ?? [],
    env: { ...(spec.env ?? {}), APM_EPHEMERAL_ID: token },
    stderr: "inherit",
  });
}

const client = new Client({ name: "apm-ts-sdk-test", version: "1.0.0" });
const out = { tools: [], calls: [] };
try {
  await client.connect(transport);
  out.server = client.getServerVersion();
  out.tools = (await client.listTools()).tools.map((t) => t.name);
  for (const call of spec.calls ?? []) {
    try {
      const result = await client.callTool({ name: call.tool, arguments: call.arguments ?? {} });
      out.calls.push({ tool: call.tool, result });
    } catch (err) {
      out.calls.push({ tool: call.tool, error: { code: err.code ?? null, message: String(err.message ?? err) } });
    }
  }
} catch (err) {
  out.fatal = { code: err.code ?? null, message: String(err.message ?? err) };
} finally {
  await client.close().catch(() => {});
}
process.stdout.write(JSON.stringify(out) + "\n");
process.exit(out.fatal ? 1 : 0);
