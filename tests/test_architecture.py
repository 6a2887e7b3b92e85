"""The package's shape, checked: imports run one way with no circles (import-linter's contracts
in pyproject.toml), every MLflow write goes through `mlexp/tracking/`, no module or function
outgrows a reader's screen, and every import inside a function says why it is there."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlexp"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# MLflow's write API: every MlflowClient method that changes the store, and the fluent API's.
WRITE_VERBS = ("create", "delete", "log", "set", "update", "rename", "restore", "finalize", "transition",
               "register", "link", "unlink", "add", "remove", "detach", "start", "end")
WRITES = {name for name in dir(MlflowClient) if name.split("_")[0] in WRITE_VERBS}
FLUENT_WRITES = WRITES | {"start_run", "end_run", "log_model", "register_model", "set_experiment", "set_tags",
                          "log_params", "log_metrics", "autolog"}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(cwd)})


def test_the_import_contracts_hold():
    checked = lint_imports(ROOT)
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    assert "2 kept, 0 broken" in checked.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    """The contracts can fail: the tracking seam importing the training run (inside a function,
    where a circle hides best) is named, with its line."""
    shutil.copytree(PACKAGE, tmp_path / "mlexp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    outbox = tmp_path / "mlexp" / "tracking" / "outbox.py"
    outbox.write_text(outbox.read_text() + "\n\ndef upward():\n    from mlexp.training import run  # noqa: F401\n")
    checked = lint_imports(tmp_path)
    assert checked.returncode == 1, checked.stdout[-4000:]
    assert "mlexp.tracking is not allowed to import mlexp.training" in checked.stdout
    assert "mlexp.tracking.outbox -> mlexp.training.run" in checked.stdout


def mlflow_writes(source: str) -> list[str]:
    """Calls of MLflow's write API in `source`: a write method on an MLflow client (named so
    throughout mlexp: `client`, `self.client`, `tracking.client_for(uri)`, `MlflowClient()`) or
    on the `mlflow` module and its flavours. The run tracker's methods of the same names are the
    seam itself, and are not counted."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = ast.unparse(node.func.value)
            by_client = "client" in receiver.lower() and node.func.attr in WRITES
            fluent = receiver.split(".")[0] == "mlflow" and node.func.attr in FLUENT_WRITES
            if by_client or fluent:
                found.append(f"line {node.lineno}: {ast.unparse(node.func)}")
    return found


def test_the_write_finder_finds_writes():
    source = ("client.set_tag(r, 'k', 'v')\nself.client.log_batch(r)\nserver.client_for(u).delete_run(r)\n"
              "mlflow.pytorch.log_model(m)\ntracker.log_metrics({})\nclient.get_run(r)\n")
    assert [line.split(":")[0] for line in mlflow_writes(source)] == ["line 1", "line 2", "line 3", "line 4"]


def test_every_mlflow_write_goes_through_tracking():
    outside = {str(path.relative_to(ROOT)): mlflow_writes(path.read_text()) for path in PACKAGE.rglob("*.py")
               if PACKAGE / "tracking" not in path.parents}
    assert {path: writes for path, writes in outside.items() if writes} == {}
    inside = sum(len(mlflow_writes(path.read_text())) for path in (PACKAGE / "tracking").rglob("*.py"))
    assert inside > 20  # the finder sees the seam's own writes


def test_modules_and_functions_stay_readable():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}(): {length} lines")
    assert too_long == []


def unexplained_imports(source: str) -> list[str]:
    """Imports inside functions that do not say why they are there: a comment on the import or
    on the line above its run of imports, or the module's `# Imported where used:` note naming
    the module in backticks (`mlflow`: every import from mlflow; `mlexp.tasks.detection`: that
    package's modules)."""
    lines = source.splitlines()
    note_names: set[str] = set()
    for index, line in enumerate(lines):
        if line.startswith("# Imported where used"):
            while index < len(lines) and lines[index].startswith("#"):
                note_names.update(name for name in lines[index].split("`")[1::2] if " " not in name)
                index += 1
    unexplained = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            first = node.lineno - 1  # the run of import lines this one belongs to, and the line above it
            while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                first -= 1
            said = any("#" in line for line in lines[max(first - 1, 0):node.end_lineno])
            named = any(module == name or module.startswith(name + ".") for name in note_names)
            if not (said or named):
                unexplained.append(f"line {node.lineno}: {lines[node.lineno - 1].strip()}")
    return sorted(set(unexplained))


def test_the_import_finder_finds_unexplained_imports():
    source = ("# Imported where used: `optuna` (0.2 s).\n\ndef f():\n    import optuna\n    import torch\n"
              "    import numpy  # here: why\n\ndef g():\n    # why these two\n    import json\n    import csv\n")
    assert unexplained_imports(source) == ["line 5: import torch"]


def test_every_import_inside_a_function_says_why():
    unexplained = {str(path.relative_to(ROOT)): unexplained_imports(path.read_text())
                   for path in sorted(PACKAGE.rglob("*.py"))}
    assert {path: found for path, found in unexplained.items() if found} == {}
