"""The product's packages import only downward, and none of them in a cycle.

Layers, top to bottom (docs/development.md lists the same):
  the CLI (installer) · the eval harness, the plugin payloads and the sidecar's HTTP server
  (sidecar.server) · the engine (sidecar.engine) · the cache tiers (sidecar.kvcache) · sessions
  (sidecar.sessions), the generated test models (sidecar.testing), supervision and presets · the δ-mem
  runtime (sidecar.delta) · the leaf (common).
Every import of the product's own modules is read from the source (module level and inside functions),
so an import added anywhere that points upward, or closes a cycle between top-level packages, fails here.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "sidecar", "supervisors", "presets", "plugin_tools", "installer")

# Module prefix → layer (higher imports lower; the longest matching prefix decides).
LAYERS: dict[str, int] = {
    "common": 0,
    "sidecar": 5,  # the package itself (empty): its modules live in the rooms below
    "sidecar.delta": 1,
    "sidecar.sessions": 2,
    "sidecar.testing": 2,
    "presets": 2,
    "supervisors": 2,
    "sidecar.kvcache": 3,
    "sidecar.engine": 4,
    "sidecar.server": 5,
    "plugin_tools": 5,
    "installer.memory_eval": 5,
    "installer.sidecar_client": 5,
    "installer": 6,
}
# Third-party packages a tool call must not load.
HEAVY = ("mlx", "mlx_lm", "fastapi", "starlette", "uvicorn", "pydantic")
# ... and what `delta-mem-mlx --help` must not load either.
CLI_HEAVY = ("numpy", "huggingface_hub", "matplotlib", "tokenizers", "transformers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _product_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names imported by a module file, relative imports resolved."""
    return _imports_in(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")


def _imports_in(source: str, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _layer(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def _graph() -> dict[str, set[str]]:
    modules = _product_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = {name for name in _imports(path, module) if name in modules}
    return graph


def test_every_product_module_has_a_layer() -> None:
    assert [m for m in _product_modules() if _layer(m) is None] == []


def test_the_sidecar_is_made_of_rooms() -> None:
    # Every sidecar module lives in a subpackage with a layer of its own: the folders show the layers.
    loose = [p.name for p in (REPO / "sidecar").glob("*.py") if p.name != "__init__.py"]
    rooms = {p.name for p in (REPO / "sidecar").iterdir() if (p / "__init__.py").exists()}
    assert loose == []
    assert {f"sidecar.{room}" for room in rooms} <= LAYERS.keys()


def test_no_module_imports_upward() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)  # type: ignore[operator]
    ]
    assert upward == []


def test_top_level_packages_form_no_cycle() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in _graph().items():
        for target in targets:
            a, b = module.split(".")[0], target.split(".")[0]
            if a != b:
                edges[a].add(b)
    cycles = [f"{a} ⇄ {b}" for a in edges for b in edges[a] if a in edges.get(b, set())]
    assert cycles == []

    # And no longer cycle: a topological order exists.
    remaining = {pkg: set(edges[pkg]) for pkg in PACKAGES}
    while remaining:
        leaves = [pkg for pkg, deps in remaining.items() if not deps & remaining.keys()]
        assert leaves, f"a cycle among {sorted(remaining)}"
        for pkg in leaves:
            del remaining[pkg]


def test_the_leaf_and_the_runtime_import_only_below_themselves() -> None:
    graph = _graph()
    leaf = {t for m, ts in graph.items() if m.startswith("common") for t in ts}
    assert {t for t in leaf if not t.startswith("common")} == set()
    runtime = {t for m, ts in graph.items() if m.startswith("sidecar.delta") for t in ts}
    assert {t for t in runtime if not t.startswith(("sidecar.delta", "common"))} == set()


@pytest.mark.parametrize("package", ["plugin_tools", "common", "supervisors", "presets"])
def test_light_packages_never_import_mlx_or_the_web_stack(package: str) -> None:
    # A tool call must not load MLX or FastAPI: checked on the source, module level or not.
    heavy = [
        f"{module} imports {name}"
        for module, path in _product_modules().items()
        if module.split(".")[0] == package
        for name in _imports(path, module)
        if name.split(".")[0] in HEAVY or name.startswith("sidecar")
    ]
    assert heavy == []


def test_the_checker_sees_imports_anywhere_in_a_module() -> None:
    # The parser itself: a relative and an absolute import, at module level and inside a function.
    source = "from . import files\n\ndef f():\n    from installer.cli import app\n"
    found = _imports_in(source, "common.example", is_package=False)
    assert found >= {"common", "common.files", "installer.cli", "installer.cli.app"}
    assert _layer("installer.cli") > _layer("common.example")  # type: ignore[operator]


def test_the_cli_imports_no_heavy_package_until_a_command_runs() -> None:
    # `delta-mem-mlx --help` and each command's --help stay fast: a command imports what is heavy when
    # it runs. Checked in a fresh interpreter. Typer itself imports pydantic to parse a command's options.
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from installer.cli import app\n"
        "def loaded(): return sorted({m.split('.')[0] for m in sys.modules})\n"
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
        "top = loaded()\n"
        "names = [c.name for c in app.registered_commands]\n"
        "for name in names:\n"
        "    assert CliRunner().invoke(app, [name, '--help']).exit_code == 0, name\n"
        "print(json.dumps({'top': top, 'commands': names, 'after': loaded()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    heavy = {*HEAVY, *CLI_HEAVY}
    assert len(seen["commands"]) >= 10
    assert sorted(heavy & set(seen["top"])) == []
    assert sorted(heavy & set(seen["after"])) == ["pydantic"]
