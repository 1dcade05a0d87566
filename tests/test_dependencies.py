"""Every third-party module the shipped packages import is declared in pyproject.toml.

Imports are read from the source (module level and inside functions) and mapped to the distributions
that provide them with importlib.metadata, so a new import of an undeclared package fails here, not on
a user's machine after `pip install`.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "sidecar", "supervisors", "presets", "plugin_tools", "installer")
# Imported only where a missing package is caught and reported: module → the extra that installs it.
OPTIONAL = {"matplotlib": "plot"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of PEP 508 requirement strings (extras, versions and markers dropped)."""
    return {_canonical(re.split(r"[\s\[<>=!~;]", r.strip(), maxsplit=1)[0]) for r in requirements}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module → the product files that import it, for modules outside the stdlib and the product."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names}:
                    if top not in PACKAGES and top not in sys.stdlib_module_names and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_of_the_product_is_a_declared_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = _names(project["dependencies"])
    extras = {extra: _names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    providers = packages_distributions()
    undeclared = []
    for module, files in sorted(_third_party_imports().items()):
        dists = {_canonical(d) for d in providers.get(module, [])}
        declared = required | extras.get(OPTIONAL.get(module, ""), set())
        if not dists & declared:
            undeclared.append(f"{module} (from {', '.join(sorted(dists)) or 'no installed distribution'}; "
                              f"imported by {', '.join(sorted(files))})")  # fmt: skip
    assert undeclared == []


def test_the_checker_sees_imports_inside_functions_and_maps_modules_to_distributions() -> None:
    imports = _third_party_imports()
    assert "sidecar/testing/tiny_model.py" in imports["tokenizers"]
    assert "installer/memory_eval/chart.py" in imports["matplotlib"]  # imported inside a function
    assert "PyYAML" in packages_distributions()["yaml"]
    assert _names(["mlx[cpu]>=0.29; platform_system == 'Linux'", "PyYAML>=6", "mlx_lm"]) == {"mlx", "pyyaml", "mlx-lm"}
