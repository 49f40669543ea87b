"""The architecture holds: no import cycle, each layer imports only what it may, commands are leaves,
the package works installed (not editable), `--help` comes from the schema, and docs name only files
that exist."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("deeplab_lit", "datamodules")
COMMANDS = {"deeplab_lit.fit", "deeplab_lit.evaluate", "deeplab_lit.summary", "deeplab_lit.crf_search",
            "deeplab_lit.report", "deeplab_lit.predict", "deeplab_lit.export", "datamodules.prepare"}
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")
            if "_data" not in p.parts}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module this file imports, at any depth (function-level imports count); `from pkg import x`
    is an import of `pkg.x` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {m for m in imports_of(path, modules) if m in modules} for name, path in modules.items()}


def third_party(path: Path) -> set[str]:
    modules = project_modules()
    return {m.split(".")[0] for m in imports_of(path, modules) if m.split(".")[0] not in PACKAGES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Which project modules each layer may import (besides its own package).
ALLOWED = {
    "deeplab_lit.models": {"deeplab_lit.errors", "deeplab_lit.registry"},
    "deeplab_lit.crf": {"deeplab_lit.errors"},
    "datamodules": {"deeplab_lit.errors", "deeplab_lit.registry", "deeplab_lit.preprocessing", "deeplab_lit.palette"},
    "deeplab_lit.protocols": set(),
    "deeplab_lit.errors": set(),
    "deeplab_lit.registry": {"deeplab_lit.errors"},
    "deeplab_lit.files": {"deeplab_lit.errors"},
    "deeplab_lit.records": {"deeplab_lit.errors", "deeplab_lit.files", "deeplab_lit.protocols", "deeplab_lit.palette"},
    "deeplab_lit.preprocessing": set(),  # leaves that data, training and the load API share
    "deeplab_lit.palette": set(),
}
FORBIDDEN_THIRD_PARTY = {"deeplab_lit.models": {"lightning", "datamodules", "wandb", "albumentations"},
                         "deeplab_lit.crf": {"lightning", "wandb"},
                         "datamodules": {"wandb"}}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_they_may(layer):
    edges, modules = graph(), project_modules()
    for module, imported in edges.items():
        if not is_under(module, layer):
            continue
        outside = {m for m in imported if not is_under(m, layer)}
        assert outside <= ALLOWED[layer], f"{module} imports {sorted(outside - ALLOWED[layer])}"
        assert not third_party(modules[module]) & FORBIDDEN_THIRD_PARTY.get(layer, set()), module


def test_commands_are_leaves():
    """No module imports a command (the report's own submodules aside); commands never import each other."""
    for module, imported in graph().items():
        for command in COMMANDS:
            if is_under(module, command):
                continue
            assert not any(is_under(m, command) for m in imported), f"{module} imports the command {command}"


def test_the_architecture_checks_catch_a_break(tmp_path):
    """The same checks on a copy of two modules with an added import: models importing lightning and the
    config, and the config importing fit."""
    edges = graph()
    edges["deeplab_lit.models.build"] = edges["deeplab_lit.models.build"] | {"deeplab_lit.config"}
    edges["deeplab_lit.config.resolve"] = edges["deeplab_lit.config.resolve"] | {"deeplab_lit.fit"}
    assert cycles(edges)  # models -> config -> models
    outside = {m for m in edges["deeplab_lit.models.build"] if not is_under(m, "deeplab_lit.models")}
    assert not outside <= ALLOWED["deeplab_lit.models"]


# ---------------------------------------------------------------------------------------------------
# Installed, not editable


@pytest.mark.slow
def test_a_regular_install_lists_every_experiment_from_any_directory(tmp_path):
    """`pip install .` (a wheel, not a link to the checkout) into a fresh directory; run from elsewhere."""
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for name in tracked:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target, follow_symlinks=False)
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                             "--target", str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**ENV, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import deeplab_lit; print(deeplab_lit.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env)
    assert where.stdout.strip().startswith(str(target))
    listed = subprocess.run([sys.executable, "-m", "deeplab_lit.fit", "--list"], cwd=elsewhere, capture_output=True,
                            text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert names == {p.stem for p in (REPO / "experiments").glob("*.yaml")}
    printed = subprocess.run([sys.executable, "-m", "deeplab_lit.fit", "--experiment", "aspp_l", "--print-config"],
                             cwd=elsewhere, capture_output=True, text=True, env=env)
    assert printed.returncode == 0 and "aspp_rates: [6, 12, 18, 24]" in printed.stdout, printed.stderr


# ---------------------------------------------------------------------------------------------------
# The repository names only files it contains


def test_docs_and_code_name_no_missing_file():
    """README, docs and every source file mention no brief outside the repository, and every relative
    Markdown link resolves."""
    texts = [REPO / "README.md", *(REPO / "docs").rglob("*.md"),
             *(p for package in PACKAGES for p in (REPO / package).rglob("*.py")), *(REPO / "tests").glob("*.py"),
             *(REPO / "experiments").rglob("*.yaml"), *(REPO / "sweeps").rglob("*.yaml"), *(REPO / "benchmarks").glob("*.py")]
    brief = re.compile(r"\b(DESIGN|PAPERS)\.md\b")
    for path in texts:
        if path == Path(__file__):
            continue
        text = path.read_text()
        assert not brief.search(text), f"{path} names a file outside the repository"
        if path.suffix == ".md":
            for link in re.findall(r"\]\(([^)#\s]+)", text):
                if "://" not in link:
                    assert (path.parent / link).exists(), f"{path}: link {link} does not exist"


def test_the_paper_catalogue_is_current():
    """docs/papers.md is generated from experiments/; regenerate it after changing an experiment."""
    from deeplab_lit.report.catalogue import render_catalogue

    assert (REPO / "docs" / "papers.md").read_text() == render_catalogue(), \
        "run: python -m deeplab_lit.report --catalogue docs/papers.md"
