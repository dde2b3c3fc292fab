"""Each stage's deps in dvc.yaml are the project modules its command imports, directly or through other modules.

A module left out of a stage's deps is a change DVC cannot see: edit the shared split in paddy.py and, without it,
`dvc repro` would keep every trained member. Every project module a stage imports can change what it writes (even
common.py: atomic writes, the JSON and CSV readers), so there are no exceptions; a module that truly could not
(a logging-only helper) would be listed in NOT_A_DEP with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"
NOT_A_DEP: dict[str, str] = {
    "pipeline/__init__.py": "empty: the package marker",
}


def imported_project_modules(module: str) -> set[str]:
    """`module` and every pipeline.* module it imports, transitively, as repository paths."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        source = ROOT / (name.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names if alias.name.startswith(PACKAGE + ".")]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == PACKAGE:  # from pipeline import vision
                    pending += [f"{PACKAGE}.{alias.name}" for alias in node.names]
                elif node.module.startswith(PACKAGE + "."):
                    pending.append(node.module)
    return {name.replace(".", "/") + ".py" for name in seen}


def stage_commands() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def stage_module(stage: dict) -> str | None:
    words = stage["cmd"].split()
    if words[:2] == ["python", "-m"] and words[2].startswith(PACKAGE + "."):
        return words[2]
    return None


@pytest.mark.parametrize("stage_name", sorted(stage_commands()))
def test_a_stages_deps_are_the_project_modules_it_imports(stage_name):
    stage = stage_commands()[stage_name]
    module = stage_module(stage)
    assert module, f"{stage_name}: its cmd does not run a pipeline module: {stage['cmd']}"
    listed = {dep for dep in stage.get("deps", []) if dep.startswith(PACKAGE + "/")}
    imported = imported_project_modules(module) - set(NOT_A_DEP)
    assert not imported - listed, f"{stage_name}: imports but does not depend on {sorted(imported - listed)}"
    assert not listed - imported, f"{stage_name}: depends on modules it never imports {sorted(listed - imported)}"


def test_the_import_walk_follows_every_import_form(tmp_path):
    # The walk must see `from pipeline import x`, `from pipeline.x import y` and `import pipeline.x`: train reaches
    # paddy.py through all three forms somewhere in its imports, and paddy.py must be found.
    assert "pipeline/paddy.py" in imported_project_modules("pipeline.train")
    assert "pipeline/vision.py" in imported_project_modules("pipeline.train")  # `from pipeline import vision`
    assert "pipeline/train.py" not in imported_project_modules("pipeline.ensemble")
