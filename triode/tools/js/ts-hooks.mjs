// Module hooks that let node 20 import TypeScript: types are stripped (or, for enums and
// namespaces, transformed) by amaro, Node's own swc-based stripper, compiled to wasm so it
// works offline once installed. Registered by worker.mjs only for a .ts entrypoint on a
// node that cannot strip types itself.
import { readFile, stat } from "node:fs/promises";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

let transformSync;

export async function initialize(data) {
  const require = createRequire(import.meta.url);
  ({ transformSync } = require(data.amaro));
}

const TS = /\.(ts|mts|cts)$/;

async function isFile(url) {
  try {
    return (await stat(fileURLToPath(url))).isFile();
  } catch {
    return false;
  }
}

// TypeScript lets `./util.js` name `./util.ts`, and `./util` name `./util.ts`.
export async function resolve(specifier, context, nextResolve) {
  try {
    return await nextResolve(specifier, context);
  } catch (err) {
    const relative = specifier.startsWith("./") || specifier.startsWith("../") || specifier.startsWith("/");
    if (!relative || !context.parentURL || !TS.test(context.parentURL)) throw err;
    const base = specifier.replace(/\.(js|mjs|cjs)$/, "");
    const ext = { js: ".ts", mjs: ".mts", cjs: ".cts" }[specifier.split(".").pop()];
    const candidates = ext ? [base + ext] : [specifier + ".ts", specifier + "/index.ts"];
    for (const candidate of candidates) {
      const url = new URL(candidate, context.parentURL);
      if (await isFile(url)) return { url: url.href, shortCircuit: true };
    }
    throw err;
  }
}

export async function load(url, context, nextLoad) {
  if (!url.startsWith("file:") || !TS.test(url)) return nextLoad(url, context);
  const filename = fileURLToPath(url);
  const source = await readFile(filename, "utf8");
  let code;
  try {
    ({ code } = transformSync(source, { mode: "strip-only", filename }));
  } catch {
    // strip-only refuses enums, namespaces and parameter properties: transform those.
    ({ code } = transformSync(source, { mode: "transform", sourceMap: false, filename }));
  }
  return { format: url.endsWith(".cts") ? "commonjs" : "module", source: code, shortCircuit: true };
}
