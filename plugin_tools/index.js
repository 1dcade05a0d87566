// The OpenClaw entry of delta-mem-mlx. It registers two agent tools; each runs
// `<python> -m plugin_tools <tool>` and hands back the one JSON object it prints.
// Zero dependencies. Every failure becomes a readable tool result, never a thrown
// error, so a broken Python install cannot break the agent's run.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const DEFAULT_TIMEOUT_SECONDS = 30;
const OUTPUT_CAP_BYTES = 1024 * 1024;
const STDERR_TAIL_CHARS = 2000;
const CONFIG_HINT =
  "set pythonCommand in plugins.entries.delta-mem-mlx.config to a Python that has openclaw-delta-mem-mlx";
const TIMEOUT_HINT = "check 'delta-mem-mlx status'; raise toolTimeoutSeconds if the machine is slow";

const TOOLS = [
  {
    name: "delta_mem_mlx_status",
    label: "δ-mem sidecar status",
    description:
      "Report on the local δ-mem MLX memory model: platform, install root (receipt, preset, model " +
      "and adapter), supervisor state and the sidecar's /health, with next steps when something is missing.",
    parameters: { type: "object", properties: {}, additionalProperties: false },
  },
  {
    name: "delta_mem_mlx_provider_config",
    label: "δ-mem provider block",
    description:
      "Return the models.providers.delta-mem-mlx block for openclaw.json, the default-model and alias " +
      "settings, and the command that applies them. Values default to the installed sidecar's.",
    parameters: {
      type: "object",
      additionalProperties: false,
      properties: {
        baseUrl: { type: "string", description: "Sidecar URL, e.g. http://127.0.0.1:8765/v1" },
        modelId: { type: "string", description: "Model id the sidecar serves" },
        contextWindow: { type: "integer", minimum: 16000, description: "Context window in tokens" },
        maxTokens: { type: "integer", minimum: 1, description: "Largest answer in tokens" },
      },
    },
  },
];

/**
 * The directory that holds the Python packages and the clone's .venv: the plugin root (the clone,
 * where openclaw.plugin.json is). OpenClaw runs a copy of this file from a capture directory that
 * leaves the clone's .venv link out, so the real location comes from api.rootDir; the parent of
 * this file's own directory (plugin_tools/) is only a fallback for a host that does not pass it.
 */
function pythonRoot(pluginDir) {
  return path.resolve(pluginDir ?? path.dirname(path.dirname(fileURLToPath(import.meta.url))));
}

/** The Python to run: the configured command, else the checkout's venv, else python3. */
function resolvePython(config, root) {
  if (config.pythonCommand) return config.pythonCommand;
  const venvPython = path.join(root, ".venv", "bin", "python");
  return existsSync(venvPython) ? venvPython : "python3";
}

function problemResult(tool, problem, hint) {
  return toolResult({ tool, summary: `${tool} failed: ${problem}`, problem, hint });
}

function toolResult(payload) {
  return { content: [{ type: "text", text: JSON.stringify(payload) }], details: payload };
}

/** Run one tool in Python from `root`; resolves to a tool result whatever happens. */
function runTool(tool, params, { config, root, signal }) {
  const python = resolvePython(config, root);
  const timeoutMs = (config.toolTimeoutSeconds || DEFAULT_TIMEOUT_SECONDS) * 1000;
  const pythonPath = [root, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter);
  return new Promise((resolve) => {
    let settled = false;
    let timer;
    let child;
    const finish = (result) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal?.removeEventListener?.("abort", onAbort);
      resolve(result);
    };
    const stop = (result) => {
      child?.kill("SIGKILL");
      finish(result);
    };
    const onAbort = () => stop(problemResult(tool, "cancelled", "ask again"));
    const cannotRun = (err) => problemResult(tool, `cannot run ${python}: ${err.message}`, CONFIG_HINT);

    try {
      // An argument list and no shell: nothing in the config or the parameters is ever parsed by a shell.
      child = spawn(python, ["-m", "plugin_tools", tool], {
        cwd: root,
        // No bytecode files: OpenClaw refuses to load a plugin whose directory changes while it copies it.
        env: { ...process.env, PYTHONPATH: pythonPath, PYTHONDONTWRITEBYTECODE: "1" },
        stdio: ["pipe", "pipe", "pipe"],
        shell: false,
        windowsHide: true,
      });
    } catch (err) {
      finish(cannotRun(err));
      return;
    }
    const stdout = [];
    let stdoutBytes = 0;
    let stderr = "";
    const timedOut = () => stop(problemResult(tool, `timed out after ${timeoutMs / 1000} s`, TIMEOUT_HINT));
    timer = setTimeout(timedOut, timeoutMs);
    signal?.addEventListener?.("abort", onAbort, { once: true });

    child.on("error", (err) => finish(cannotRun(err)));
    child.stdout.on("data", (chunk) => {
      stdoutBytes += chunk.length;
      if (stdoutBytes > OUTPUT_CAP_BYTES) {
        stop(problemResult(tool, `printed more than ${OUTPUT_CAP_BYTES} bytes`, "report this as a bug"));
        return;
      }
      stdout.push(chunk);
    });
    child.stderr.on("data", (chunk) => {
      stderr = (stderr + chunk.toString("utf8")).slice(-STDERR_TAIL_CHARS);
    });
    child.on("close", (code, killedBy) => {
      if (code !== 0) {
        const how = killedBy ? `was killed by ${killedBy}` : `exited with code ${code}`;
        const tail = stderr.trim().split("\n").slice(-3).join(" | ");
        const hint = `run '${python} -m plugin_tools ${tool}' in ${root} to see the error; ${CONFIG_HINT}`;
        finish(problemResult(tool, `${python} -m plugin_tools ${how}${tail ? `: ${tail}` : ""}`, hint));
        return;
      }
      const text = Buffer.concat(stdout).toString("utf8");
      let payload;
      try {
        payload = JSON.parse(text);
      } catch {
        payload = undefined;
      }
      if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
        const shown = JSON.stringify(text.trim().slice(0, 200));
        finish(problemResult(tool, `printed something that is not a JSON object: ${shown}`, CONFIG_HINT));
        return;
      }
      finish(toolResult(payload));
    });
    // The child may exit before reading its input; that is reported by 'close', not here.
    child.stdin.on("error", () => {});
    child.stdin.end(JSON.stringify({ config, params: params ?? {} }));
  });
}

export default {
  id: "delta-mem-mlx",
  name: "δ-mem MLX",
  description: "Status and provider-config tools for the local δ-mem MLX sidecar.",
  register(api) {
    const config = api.pluginConfig ?? {};
    const root = pythonRoot(api.rootDir);
    for (const spec of TOOLS) {
      api.registerTool({
        ...spec,
        execute: (_toolCallId, params, signal) => runTool(spec.name, params, { config, root, signal }),
      });
    }
  },
};
