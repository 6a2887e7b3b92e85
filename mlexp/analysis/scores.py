"""What a task's runs are compared on by default: its validation curve, the best of it, its
test value. Classification compares accuracy (val/acc, best/val_acc, test/acc); a detector
compares COCO mAP (val/map, best/val_map, test/map). compare's tables, CSV columns and plots
are named after the score, so a detector's report never calls its mAP an accuracy."""

from __future__ import annotations

from dataclasses import dataclass

from mlexp.errors import MlexpError


@dataclass(frozen=True)
class Score:
    task: str
    name: str                # the suffix of compare's columns: best_val_<name>, final_val_<name>
    label: str               # how tables and plots say it
    train: str | None        # the training split's curve, where the task logs one

    @property
    def curve(self) -> str:
        return f"val/{self.name}"

    @property
    def best(self) -> str:
        return f"best/val_{self.name}"

    @property
    def test(self) -> str:
        return f"test/{self.name}"

    def columns(self, names) -> dict[str, str]:
        """compare's internal column names (accuracy's) -> this score's, for what is written."""
        if self.name == "acc":
            return {}
        return {name: name.replace("val_acc", f"val_{self.name}") for name in names if "val_acc" in name}

    def worded(self, text: str) -> str:
        """compare's own wording (tables, notes, report.md) said of this score: accuracy's is the
        wording the code writes, a detector's report says mAP wherever it would say accuracy."""
        if self.name == "acc":
            return text
        for said, meant in (("val_acc", f"val_{self.name}"), ("val/acc", self.curve), ("test/acc", self.test),
                            ("best val %", f"best val {self.label} %"), ("final val %", f"final val {self.label} %"),
                            ("val acc", f"val {self.label}"), ("accuracy", self.label)):
            text = text.replace(said, meant)
        return text


ACCURACY = Score("classification", "acc", "accuracy", "train/acc")
MEAN_AP = Score("detection", "map", "mAP", None)
SCORES = {score.task: score for score in (ACCURACY, MEAN_AP)}


def score_of(tasks: set[str], chosen: dict[str, str] | None = None) -> Score:
    """The score of the compared runs' task (runs from before tasks existed are classifiers).
    Runs of several tasks have no common measure: the classifiers are compared (as before
    there were tasks), the others left out with the reason (compare.run_table). A task of the
    user's own is measured by the validation metric its runs chose their best epoch by
    (`chosen`: task -> their --best-metric, the task's primary metric unless they said otherwise)."""
    tasks = tasks or {"classification"}
    if len(tasks) > 1:
        tasks = {"classification"} if "classification" in tasks else {sorted(tasks)[0]}
    [task] = tasks
    if task in SCORES:
        return SCORES[task]
    metric = (chosen or {}).get(task) or ""
    if not metric.startswith("val/"):
        raise MlexpError(f"compare knows no score for task {task!r} (its runs chose their best epoch by "
                         f"{metric or 'nothing'}); compare it on a metric of its runs (--metric)")
    return Score(task, metric[4:], metric[4:], None)
