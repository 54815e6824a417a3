"""The layering rules of the package, checked on the source (no Ray, no torch).

Stage modules (diffinf_ray/stages/*.py) never import one another: what several stages share
lives outside stages/ (datasets.py reads and writes data, artifacts.py loads finished stages'
outputs, models/ trains and evaluates the classifier).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffinf_ray"
STAGES_DIR = PACKAGE / "stages"
STAGES_PACKAGE = "diffinf_ray.stages"


def stage_module_names() -> set[str]:
    return {p.stem for p in STAGES_DIR.glob("*.py") if p.stem != "__init__"}


def _imported_modules(node: ast.AST) -> list[str]:
    """Absolute module names an import statement in a stage module reaches."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative to diffinf_ray/stages/ (level 1) or above
            base = STAGES_PACKAGE.split(".")[: 2 - node.level + 1]
            module = ".".join([*base, *([node.module] if node.module else [])])
        else:
            module = node.module or ""
        # `from diffinf_ray.stages import train` imports the module diffinf_ray.stages.train
        return [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return []


def stage_to_stage_imports(source: str, filename: str, own: str, stages: set[str]) -> list[str]:
    """`file:line: statement` for every import of another stage module in `source`, at the
    top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        for module in _imported_modules(node):
            parts = module.split(".")
            if (parts[:2] == STAGES_PACKAGE.split(".") and len(parts) > 2
                    and parts[2] in stages and parts[2] != own):
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
                break
    return found


def test_no_stage_module_imports_another():
    stages = stage_module_names()
    offending = []
    for path in sorted(STAGES_DIR.glob("*.py")):
        offending += stage_to_stage_imports(path.read_text(), f"diffinf_ray/stages/{path.name}",
                                            path.stem, stages)
    assert not offending, ("stage modules import other stage modules (move the shared code to "
                           "datasets.py, artifacts.py or models/):\n" + "\n".join(offending))


def test_the_check_sees_every_form_of_import():
    stages = {"train", "edit", "influence"}
    source = """
import numpy
from diffinf_ray.datasets import split_dataset
from diffinf_ray.stages.edit import STAGE_FOLDER
def f():
    from diffinf_ray.stages.train import train_classifier
    import diffinf_ray.stages.influence
    from diffinf_ray.stages import train
    from .train import split_dataset
    from . import influence
"""
    found = stage_to_stage_imports(source, "x.py", "edit", stages)
    assert [line.split(":")[1] for line in found] == ["6", "7", "8", "9", "10"]
    assert "from diffinf_ray.stages.train import train_classifier" in found[0]
    assert stage_to_stage_imports("from diffinf_ray.stages.edit import X\n", "edit.py", "edit",
                                  stages) == []


def test_no_function_is_much_longer_than_80_lines():
    """Issue 12's bound on function length (a newcomer reads a function on a screen or two):
    the longest today is 82 lines; 85 leaves room for a docstring line, not for a new loop."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 85:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} "
                                f"{node.name} ({length} lines)")
    assert not long, "functions over 85 lines:\n" + "\n".join(long)
