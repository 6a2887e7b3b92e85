"""What a study's launcher hands its workers: the whole plan (the same study, by name), and no
credential."""

from __future__ import annotations

from mlexp.config import TrainConfig
from mlexp.sweep.space import parse_space
from mlexp.sweep.study_plan import Arm, StudyPlan
from mlexp.sweep.study_workers import plan_from_json, plan_to_json


def test_a_worker_reads_back_the_same_study_without_the_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = TrainConfig(data="digits", epochs=3, img_size=16, tracking_uri="http://alice:s3cret@mlflow.lab:5000")
    plan = StudyPlan(base, [Arm("resnet18", "pretrained", "full"), Arm("resnet18", "scratch", "linear")],
                     parse_space("lr=1e-5:1e-1:log,warmup_epochs=0:5:int,label_smoothing=0,0.1"), "qmc", 7, 5,
                     "hyperband", [1, 2], "postgresql://mlexp@db/optuna", worker=1)
    text = plan_to_json(plan)
    assert "s3cret" not in text and "alice" not in text
    again = plan_from_json(text)
    assert again.name == plan.name  # the same study: the worker joins it, never starts another
    assert again.worker == 1 and again.name == StudyPlan(base, plan.arms, plan.space, "qmc", 7, 5, "hyperband").name
    assert (again.arms, again.space, again.sampler, again.seed, again.trials, again.pruner, again.final_seeds,
            again.storage) == (plan.arms, plan.space, "qmc", 7, 5, "hyperband", [1, 2], "postgresql://mlexp@db/optuna")
    assert again.out_dir == tmp_path / "mlexp-output" / "tune" and again.out_dir.is_absolute()
    assert again.base.replace(tracking_uri=base.tracking_uri) == base
    assert again.base.tracking_uri is None
