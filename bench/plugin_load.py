"""OpenClaw plugin load time with and without the quick start's venv: `python -m bench.plugin_load --json`.

Clones this repository's HEAD (`git clone`, so only committed work is measured) into a temp dir
three times:

- `no_venv`: the clone as it comes;
- `quick_start`: set up as the README's quick start does: the venv beside the clone
  (`<clone>.venv`, `pip install -e '.[test]'`) and `.venv` a link to it;
- `venv_inside`: the same venv copied into the clone as a `.venv` folder (the layout the quick start
  avoids; its scripts still point at the other venv, which loading never runs).

Each clone is linked into its own OpenClaw home (`plugins install -l`), then `openclaw plugins
inspect delta-mem-mlx --runtime --json` is timed `--runs` times per clone: `no_venv` and
`quick_start` take turns round by round (which goes first alternates), so that the machine's noise
falls on both; `venv_inside` runs after them, because each of its loads writes ~0.8 GB and the next
command paid for it (run in the same rounds, `no_venv`, which followed it, came out slower than
`quick_start`). Every run must report the plugin loaded with both
tools. Reports the medians, their ratios to `no_venv`, what OpenClaw copies from each clone on a
load, and the load average. Uses the Node 24 and OpenClaw 2026.9.6 that tests/test_openclaw_e2e.py installs
into .cache/openclaw-e2e/ (or --node and --openclaw). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
E2E_CACHE = REPO_ROOT / ".cache" / "openclaw-e2e"
PLUGIN_ID = "delta-mem-mlx"
TOOLS = {"delta_mem_mlx_status", "delta_mem_mlx_provider_config"}
CASES = ("no_venv", "quick_start", "venv_inside")
COMPARED = ("no_venv", "quick_start")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    args = _parser().parse_args(argv)
    node, openclaw = _openclaw(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    commit = _git(REPO_ROOT, "rev-parse", "HEAD").strip()
    with tempfile.TemporaryDirectory(prefix="delta-mem-plugin-load-") as tmp:
        work = Path(tmp)
        clones = {case: _clone(commit, work / case / "openclaw-delta-mem-mlx") for case in CASES}
        venv = _quick_start_venv(clones["quick_start"])
        _log("copying the venv into the venv_inside clone")
        shutil.copytree(venv, clones["venv_inside"] / ".venv", symlinks=True)
        homes = {case: _home(work / case / "home") for case in CASES}
        for case in CASES:
            _log(f"{case}: plugins install -l {clones[case]}")
            install = ["plugins", "install", "-l", str(clones[case]), "--force", "--accept-capabilities"]
            _openclaw_run(node, openclaw, homes[case], install)
        seconds: dict[str, list[float]] = {case: [] for case in CASES}
        for round_ in range(args.runs):
            for case in COMPARED if round_ % 2 == 0 else COMPARED[::-1]:
                seconds[case].append(_time_inspect(node, openclaw, homes[case]))
            _log(f"round {round_ + 1}: " + ", ".join(f"{case} {seconds[case][-1]:.2f} s" for case in COMPARED))
        for _ in range(args.runs):
            seconds["venv_inside"].append(_time_inspect(node, openclaw, homes["venv_inside"]))
            _log(f"venv_inside {seconds['venv_inside'][-1]:.2f} s")
        copied = {case: copied_by_openclaw(clones[case]) for case in CASES}
        venv_mb = _megabytes(_tree_bytes(venv))
        version = _openclaw_run(node, openclaw, homes["no_venv"], ["--version"]).strip()
    medians = {case: statistics.median(seconds[case]) for case in CASES}
    ratio = medians["quick_start"] / medians["no_venv"]
    report = {
        "openclaw": version,
        "commit": commit,
        "runs": args.runs,
        "venv_mb": venv_mb,
        "cases": {
            case: {
                "seconds": [round(s, 2) for s in seconds[case]],
                "median_s": round(medians[case], 2),
                "ratio_to_no_venv": round(medians[case] / medians["no_venv"], 2),
                "copied_per_load": copied[case],
            }
            for case in CASES
        },
        "targets": {"quick_start_within_1_3x_no_venv": ratio <= 1.3},
        "load_average_1min": {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def copied_by_openclaw(root: Path) -> dict[str, float]:
    """The files and megabytes OpenClaw 2026.9.6 copies from a plugin root each time it loads it.

    Its rule (dist/plugin-generation-artifact-*.mjs: capturePluginGenerationArtifact → copyPackage →
    copy): everything under the root, recursively, except entries named `node_modules` or `.git`
    and links whose target lies outside the root; a link that stays inside is followed.
    """
    real_root = root.resolve()
    files = size = 0
    pending = [root]
    while pending:
        for entry in os.scandir(pending.pop()):
            if entry.name in ("node_modules", ".git"):
                continue
            target = Path(entry.path).resolve()
            if entry.is_symlink() and not target.is_relative_to(real_root):
                continue
            if target.is_dir():
                pending.append(Path(entry.path))
            else:
                files += 1
                size += target.stat().st_size
    return {"files": files, "mb": _megabytes(size)}


def _openclaw(args: argparse.Namespace) -> tuple[Path, Path]:
    node = args.node or next(E2E_CACHE.glob("node/node_modules/node-*/bin/node"), None)
    openclaw = args.openclaw or E2E_CACHE / "openclaw" / "node_modules" / "openclaw" / "openclaw.mjs"
    if node is None or not Path(node).exists() or not Path(openclaw).exists():
        raise SystemExit(
            "no Node 24 / OpenClaw found: run `.venv/bin/python -m pytest -q tests/test_openclaw_e2e.py` once "
            "(it installs them into .cache/openclaw-e2e/), or pass --node and --openclaw"
        )
    return Path(node), Path(openclaw)


def _clone(commit: str, target: Path) -> Path:
    # A plain `git clone` checks out the source's default branch: check out the measured commit.
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(REPO_ROOT), str(target)], check=True)
    _git(target, "checkout", "--quiet", commit)
    return target


def _quick_start_venv(clone: Path) -> Path:
    """The README quick start's set-up, without its selftest: returns the venv beside the clone."""
    venv = clone.with_name(clone.name + ".venv")
    _log(f"quick start: {venv} (pip install -e '.[test]', about a minute)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (clone / ".venv").symlink_to(venv)
    pip = [str(clone / ".venv" / "bin" / "pip"), "install", "--quiet", "-e", ".[test]"]
    subprocess.run(pip, cwd=clone, check=True)
    return venv


def _home(path: Path) -> Path:
    (path / ".openclaw").mkdir(parents=True)
    return path


def _openclaw_run(node: Path, openclaw: Path, home: Path, args: list[str]) -> str:
    """`openclaw <args>` with HOME=home (OpenClaw's own path overrides removed); returns its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCLAW_")}
    env.update(HOME=str(home), NO_COLOR="1", PATH=f"{node.parent}{os.pathsep}{env.get('PATH', '')}")
    done = subprocess.run(
        [str(node), str(openclaw), *args], capture_output=True, text=True, env=env, cwd=home, timeout=900, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"openclaw {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _time_inspect(node: Path, openclaw: Path, home: Path) -> float:
    """Wall time of one `plugins inspect --runtime`, which must load the plugin with both tools."""
    started = time.perf_counter()
    stdout = _openclaw_run(node, openclaw, home, ["plugins", "inspect", PLUGIN_ID, "--runtime", "--json"])
    elapsed = time.perf_counter() - started
    plugin = json.loads(stdout)["plugin"]
    if plugin["status"] != "loaded" or not TOOLS <= set(plugin["toolNames"]):
        raise SystemExit(f"the plugin did not load with both tools from {home}: {plugin.get('error')}")
    return elapsed


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def _tree_bytes(root: Path) -> int:
    return sum(path.lstat().st_size for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def _megabytes(size: int) -> float:
    return round(size / 1e6, 1)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.plugin_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report on one line")
    parser.add_argument("--runs", type=int, default=5, help="timed loads per clone (the medians are of these)")
    parser.add_argument("--node", type=Path, help="a Node 24 binary (default: the e2e tests' in .cache/openclaw-e2e/)")
    parser.add_argument("--openclaw", type=Path, help="OpenClaw's openclaw.mjs (default: the e2e tests')")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
