"""How `--task` finds a task of the user's own, and the one line it says when what it found is
not one (the CLI prints it and exits 2: tests/e2e/test_own_task_e2e.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from mlexp.errors import MlexpError
from mlexp.tasks.kinds import TASKS, task_named


@pytest.fixture
def users_folder(tmp_path, monkeypatch):
    shutil.copy(Path(__file__).parents[1] / "own_task" / "mytasks.py", tmp_path / "mytasks.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    sys.modules.pop("mytasks", None)
    task_named.cache_clear()


def test_module_class_is_found_in_the_users_folder_and_made_once(users_folder):
    task = task_named("mytasks:InkRegression")
    assert task.name == "ink" and task.primary_metric == "val/r2" and task_named("mytasks:InkRegression") is task
    assert task_named("detection") is TASKS["detection"]


@pytest.mark.parametrize("reference, said", [
    ("mytasks:NoSuchTask", "--task mytasks:NoSuchTask: module 'mytasks' has no 'NoSuchTask'"),
    ("nosuchmodule:Task", "--task nosuchmodule:Task: cannot import module 'nosuchmodule'"),
    ("segmentation", "--task 'segmentation' is not a task: classification, detection, or MODULE:CLASS"),
    ("mytasks:InkDigits", "--task mytasks:InkDigits: InkDigits() cannot be made without arguments"),
    ("mytasks:load_digits", "--task mytasks:load_digits: load_digits lacks name, components, metrics"),
])
def test_what_is_not_a_task_is_one_line_naming_what_is_wrong(users_folder, reference, said):
    with pytest.raises(MlexpError) as error:
        task_named(reference)
    assert said in str(error.value) and "\n" not in str(error.value)


def test_a_task_is_served_when_it_says_what_a_client_sends_and_what_its_model_answers(users_folder):
    from mlexp.tasks.kinds import is_served, task_reference

    assert is_served(TASKS["classification"]) and is_served(TASKS["detection"])
    assert is_served(task_named("mytasks:InkRegression"))  # example_input and predict
    (users_folder / "unserved.py").write_text(
        "import mytasks\n\n"
        "class Unserved:  # a task without example_input and predict\n"
        "    name, components, metrics, primary_metric, collate = 'ink', (), ('r2',), 'val/r2', None\n"
        "    check_data = build_data = build_model = loss = evaluate = mytasks.InkRegression.evaluate\n")
    assert not is_served(task_named("unserved:Unserved"))  # its runs keep their weights, not a logged model
    assert task_reference("mytasks:InkRegression") == "mytasks:InkRegression" and task_reference("detection") is None
    sys.modules.pop("unserved", None)
