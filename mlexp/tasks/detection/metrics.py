"""COCO's box metrics, computed by torchmetrics' MeanAveragePrecision over pycocotools:
mAP over IoU 0.50:0.95, at 0.50 and at 0.75, and each class's AP."""

from __future__ import annotations


def new_map_metric():
    # here: torchmetrics loads in about a second, which a classification run never needs
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools")


def map_results(metric, class_names: list[str]) -> tuple[dict[str, float], list[dict]]:
    """({"map", "map_50", "map_75"}, one row per class: name, AP). A class with no ground truth
    and no prediction has no AP (COCO's -1): its row says so with NaN."""
    computed = metric.compute()
    scores = {key: float(computed[key]) for key in ("map", "map_50", "map_75")}
    per_class = computed["map_per_class"].reshape(-1).tolist()
    ids = computed["classes"].reshape(-1).tolist()
    ap = {int(class_id): value for class_id, value in zip(ids, per_class)}
    rows = [{"class": name, "ap": ap[index + 1] if ap.get(index + 1, -1) >= 0 else float("nan")}
            for index, name in enumerate(class_names)]
    return scores, rows


def as_metric_inputs(detections: list[dict], targets: list[dict]) -> tuple[list[dict], list[dict]]:
    """Detector outputs and targets on the CPU, in the metric's keys."""
    predictions = [{"boxes": d["boxes"].float().cpu(), "scores": d["scores"].float().cpu(),
                    "labels": d["labels"].cpu()} for d in detections]
    truths = [{"boxes": t["boxes"].float().cpu(), "labels": t["labels"].cpu()} for t in targets]
    return predictions, truths
