// Triode tool worker: loads one entrypoint and serves calls to its tools, one at a time.
//
// Runs under bun and node alike. The host starts it as
//     <runtime> worker.mjs --channel-fd N [--amaro PATH] ENTRYPOINT
// with stdin carrying requests and fd N (a pipe the host handed over) carrying replies;
// fds 1 and 2 both go to the host's log pipe. So nothing a tool prints, through console,
// process.stdout or even fs.writeSync(1), can reach the channel: only this file writes N.
//
// Frames both ways: a 4-byte big-endian length, then that many bytes of UTF-8 JSON.
//   worker -> host, once:  {"type":"ready","tools":[...],"runtime":"node v20..","pid":N}
//                    or:   {"type":"load_error","kind":"load"|"typescript","error":{name,message,stack}}
//   host -> worker:        {"type":"call","id":N,"tool":"name","input":<json>}
//   worker -> host:        {"type":"result","id":N,"ok":true,"output":<json>}
//                    or:   {"type":"result","id":N,"ok":false,"error":{...},"recycle":bool}
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const MAX_STACK = 16 * 1024;
const MAX_MESSAGE = 4 * 1024;

function parseArgs(argv) {
  const opts = { channelFd: -1, amaro: "", entrypoint: "" };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--channel-fd") opts.channelFd = Number(argv[++i]);
    else if (a === "--amaro") opts.amaro = argv[++i];
    else opts.entrypoint = a;
  }
  if (!Number.isInteger(opts.channelFd) || opts.channelFd < 3 || !opts.entrypoint) {
    process.stderr.write("usage: worker.mjs --channel-fd N [--amaro PATH] ENTRYPOINT\n");
    process.exit(64);
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const runtime = typeof Bun !== "undefined" ? `bun ${Bun.version}` : `node ${process.version}`;

// Console output belongs to the log, never to the channel (fd 1 already points there too).
for (const name of ["log", "info", "debug"]) {
  console[name] = (...args) => console.error(...args);
}

function writeFrame(text) {
  const body = Buffer.from(text, "utf8");
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);
  let offset = 0;
  while (offset < frame.length) {
    try {
      offset += fs.writeSync(opts.channelFd, frame, offset, frame.length - offset);
    } catch (err) {
      if (err && err.code === "EAGAIN") continue;
      process.exit(0); // the host is gone: nothing left to serve
    }
  }
}

function send(message) {
  writeFrame(JSON.stringify(message));
}

function clip(text, limit) {
  text = String(text ?? "");
  return text.length > limit ? text.slice(0, limit) + "\u2026" : text;
}

function describe(err) {
  if (err instanceof Error || (err && typeof err === "object" && typeof err.message === "string")) {
    return {
      name: clip(err.name || "Error", 200),
      message: clip(err.message, MAX_MESSAGE),
      stack: clip(err.stack, MAX_STACK),
    };
  }
  let message;
  try { message = typeof err === "string" ? err : JSON.stringify(err); } catch { message = String(err); }
  return { name: "Error", message: clip(message, MAX_MESSAGE), stack: "" };
}

function isTypeScript(file) {
  return /\.(ts|mts|cts|tsx)$/.test(file);
}

async function load() {
  const file = path.resolve(opts.entrypoint);
  if (typeof Bun === "undefined" && isTypeScript(file) && !process.features?.typescript) {
    if (!opts.amaro) {
      return { error: { name: "RuntimeMissing", message:
        `node ${process.version} cannot run TypeScript by itself and the amaro type stripper was not found; ` +
        "run scripts/setup-js (or `npm install --prefix ~/.cache/triode/js amaro`), or use runtime bun", stack: "" },
        kind: "typescript" };
    }
    const { register } = await import("node:module");
    register(new URL("./ts-hooks.mjs", import.meta.url), { data: { amaro: opts.amaro } });
  }
  let mod;
  try {
    mod = await import(pathToFileURL(file).href);
  } catch (err) {
    return { error: describe(err), kind: "load" };
  }
  const tools = new Map();
  const dflt = mod.default;
  if (dflt && typeof dflt === "object") {
    for (const key of Object.keys(dflt)) {
      if (typeof dflt[key] === "function") tools.set(key, dflt[key].bind(dflt));
    }
  }
  for (const key of Object.keys(mod)) {
    if (key !== "default" && typeof mod[key] === "function") tools.set(key, mod[key]);
  }
  return { tools };
}

let current = null; // id of the call in progress
let tools = new Map();

// A throw or rejection nobody awaited: it fails the call in progress (the tool's state may
// be broken, so the host recycles the worker) or, between calls, is only logged.
function stray(err) {
  const info = describe(err);
  process.stderr.write(`triode worker: uncaught ${info.name}: ${info.message}\n`);
  if (current !== null) {
    const id = current;
    current = null;
    send({ type: "result", id, ok: false, error: info, recycle: true });
  }
}
process.on("uncaughtException", stray);
process.on("unhandledRejection", stray);

async function handle(message) {
  if (!message || message.type !== "call" || !Number.isInteger(message.id) || typeof message.tool !== "string") {
    process.stderr.write("triode worker: malformed request from host\n");
    process.exit(65);
  }
  if (current !== null) {
    process.stderr.write("triode worker: a second call arrived while one was in progress\n");
    process.exit(65);
  }
  const id = message.id;
  const fn = tools.get(message.tool);
  if (!fn) {
    send({ type: "result", id, ok: false, error: { name: "ToolNotFound", message: message.tool, stack: "" },
           not_found: true, tools: [...tools.keys()] });
    return;
  }
  current = id;
  let reply;
  try {
    const value = await fn(message.input);
    let output;
    try {
      output = JSON.stringify(value === undefined ? null : value);
    } catch (err) {
      throw new TypeError(`the result of ${message.tool} is not JSON: ${err && err.message}`);
    }
    reply = `{"type":"result","id":${id},"ok":true,"output":${output}}`;
  } catch (err) {
    reply = JSON.stringify({ type: "result", id, ok: false, error: describe(err) });
  }
  if (current !== id) return; // a stray error already answered this call
  current = null;
  writeFrame(reply);
}

// Stdin closing before "ready" (the check in scripts/setup-js reads from /dev/null) still
// lets the load finish and be reported; after "ready" it ends the worker at once.
let ready = false;
let stopRequested = false;
function stop() {
  if (ready) process.exit(0);
  stopRequested = true;
}

function serve() {
  // Chunks are kept as they come and joined once a whole frame is there, so a large
  // input costs one copy, not one per chunk.
  let chunks = [];
  let length = 0;
  let need = -1;
  const joined = () => {
    if (chunks.length > 1) chunks = [Buffer.concat(chunks, length)];
    return chunks[0];
  };
  let chain = Promise.resolve();
  const onData = (chunk) => {
    chunks.push(chunk);
    length += chunk.length;
    for (;;) {
      if (need < 0) {
        if (length < 4) break;
        need = joined().readUInt32BE(0);
      }
      if (length < 4 + need) break;
      const buffered = joined();
      const body = buffered.subarray(4, 4 + need);
      const rest = buffered.subarray(4 + need);
      chunks = rest.length ? [rest] : [];
      length = rest.length;
      need = -1;
      let message;
      try {
        message = JSON.parse(body.toString("utf8"));
      } catch {
        process.stderr.write("triode worker: request is not JSON\n");
        process.exit(65);
      }
      chain = chain.then(() => handle(message));
    }
  };
  // The host closing our stdin is the signal to stop, whatever timers a tool left behind.
  if (typeof Bun !== "undefined") {
    // Bun's own stdin stream starts in half the time of its process.stdin emulation.
    (async () => {
      const reader = Bun.stdin.stream().getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return stop();
        onData(Buffer.from(value.buffer, value.byteOffset, value.byteLength));
      }
    })().catch(stop);
    return;
  }
  process.stdin.on("data", onData);
  process.stdin.on("end", stop);
  process.stdin.on("error", stop);
}

// Listen first: some runtimes set stdin up lazily, and that then overlaps the module load
// instead of delaying the first call. The host sends nothing before "ready".
serve();
const loaded = await load();
if (loaded.error) {
  send({ type: "load_error", kind: loaded.kind, error: loaded.error });
  process.exit(0);
}
tools = loaded.tools;
send({ type: "ready", tools: [...tools.keys()].sort(), runtime, pid: process.pid });
ready = true;
if (stopRequested) process.exit(0);
