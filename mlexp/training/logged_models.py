"""mlexp's trained classifiers as MLflow models, and finding them again.

A training run logs two MLflow logged models, `best` (the best-on-validation weights, at the
best epoch's step) and `final` (at the last epoch's step). Each is a pyfunc model:

- input: a batch of RGB images as uint8 arrays, shape (N, H, W, 3), any H and W (the model
  resizes and normalises them exactly as the run's validation images were). Over HTTP
  (`mlflow models serve`), POST /invocations with {"inputs": [image, ...]} where each image is
  a nested list of rows of [r, g, b] values 0-255;
- output: one row per image, the probability of each class (float32) in columns named by the
  class names; a detector's (a run of `--task detection`): one row per image with `boxes`
  ([x1, y1, x2, y2] in that image's pixels), `labels` (class names) and `scores`, best first.

A task of the user's own that is served (mlexp.tasks.kinds.is_served) takes what its
`example_input` shows (its input example and signature) and answers its `predict`'s rows; its
module's source travels in the model (code/), or its package is a requirement.

The weights and the run's effective configuration travel inside it (artifacts/classifier/), so
`mlexp evaluate`, `--weights models:/NAME@ALIAS` and serving all rebuild the same network.
"""

# Imported where used: `mlflow` (its models API loads pydantic and fastapi, about 1 s), because
# a training run imports this module and its first step should not wait for them.
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image

from mlexp.config import TrainConfig
from mlexp.data.images import to_rgb8
from mlexp.data.stacks import is_stack, load_stack
from mlexp.data.transforms import build_transforms
from mlexp.errors import MlexpError
from mlexp.models.build import create_model
from mlexp.models.catalogue import resolve_backbone
from mlexp.models.plugins import copy_plugin_sources, plugin_requirements
from mlexp.models.strategies import attach_head
from mlexp.tasks.kinds import TASKS, task_named, task_reference
from mlexp.tracking.server import first_line
from mlexp.training.checkpoints import WEIGHTS_FILE, load_weights, save_weights

CLASSIFIER_ARTIFACT = "classifier"  # the folder inside the MLflow model: classifier.json + weights
CLASSIFIER_FILE = "classifier.json"
CODE_DIR = "code"  # a network of the user's own: its module's source, put on sys.path to rebuild it
MODEL_TYPE = "mlexp-image-classifier"
MODEL_TAG = "mlexp.model"  # on every logged model and registered model mlexp writes
PREDICT_BATCH = 64


@dataclass
class Classifier:
    """A trained network with the transforms of its run's validation images."""

    model: torch.nn.Module
    transform: object
    class_names: list[str]
    config: dict
    task_reference: str | None = None  # a user's task: MODULE:CLASS as trained (its name may be declared nowhere here)

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        """Logits for PIL images (any mode, any size), in batches."""

        outputs = []
        for start in range(0, len(images), PREDICT_BATCH):
            batch = torch.stack([self.transform(to_rgb8(image) if isinstance(image, Image.Image) else image)
                                 for image in images[start:start + PREDICT_BATCH]])
            outputs.append(self.model(batch).float())
        return torch.cat(outputs) if outputs else torch.zeros(0, len(self.class_names))


def write_classifier(folder: Path, config: dict, class_names: list[str], weights: dict[str, torch.Tensor]) -> Path:
    """The weights (safetensors) and what rebuilds their network, in `folder`."""

    folder.mkdir(parents=True, exist_ok=True)
    save_weights(weights, folder / WEIGHTS_FILE)
    reference = task_reference(config.get("task", "classification"))
    copy_plugin_sources(config.get("backbone", ""), config.get("plugins"), folder / CODE_DIR, own_modules(reference))
    described = {"config": config, "class_names": class_names, **({"task_reference": reference} if reference else {})}
    (folder / CLASSIFIER_FILE).write_text(json.dumps(described, indent=2))
    return folder


def load_classifier(folder: Path) -> Classifier:
    """The network a model folder describes, its weights loaded: a classifier, or (task
    detection) the detector its run trained, with the run's validation transforms."""
    described = json.loads((folder / CLASSIFIER_FILE).read_text())
    cfg = TrainConfig.from_dict(described["config"])
    if (folder / CODE_DIR).is_dir() and str(folder / CODE_DIR) not in sys.path:
        sys.path.insert(0, str(folder / CODE_DIR))  # the user's own network travels as source
    class_names = list(described["class_names"])
    spec = resolve_backbone(cfg.backbone, cfg.init, cfg.plugins).with_in_chans(cfg.in_chans)
    model = create_model(spec, len(class_names), cfg.img_size)
    if cfg.task == "classification":
        attach_head(model, cfg.head, len(class_names))
    else:  # a user's task by the MODULE:CLASS it was trained with: no package need declare its name here
        model = task_named(described.get("task_reference", cfg.task)).build_model(spec, model, cfg, len(class_names))
    model.load_state_dict(load_weights(folder / WEIGHTS_FILE))
    transform = build_transforms(cfg, train=False) if cfg.task == "classification" else None
    return Classifier(model.eval(), transform, class_names, described["config"], described.get("task_reference"))


@torch.no_grad()
def detections(detector: Classifier, images: list) -> pd.DataFrame:
    """One row per image: its boxes ([x1, y1, x2, y2] in the image's own pixels), their class
    names and scores. Each image is resized to the run's square size as in training, and
    the boxes are scaled back."""
    from mlexp.tasks.detection.images import detector_input  # here: a classifier's serving never needs it

    size, in_chans = int(detector.config["img_size"]), int(detector.config.get("in_chans", 3))
    rows = []
    for start in range(0, len(images), PREDICT_BATCH):
        batch = images[start:start + PREDICT_BATCH]
        pixels = [detector_input(image, size, in_chans) for image in batch]  # as training fed it
        for image, found in zip(batch, detector.model(pixels)):
            height, width = (image.shape[0], image.shape[1]) if isinstance(image, np.ndarray) else (image.height,
                                                                                                     image.width)
            scale = torch.tensor([width / size, height / size] * 2)
            rows.append({"boxes": (found["boxes"] * scale).tolist(),
                         "labels": [detector.class_names[int(label) - 1] for label in found["labels"]],
                         "scores": found["scores"].tolist()})
    return pd.DataFrame(rows, columns=["boxes", "labels", "scores"])


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour: uint8 images in, class probabilities out (see the module's docstring)."""

    def load_context(self, context) -> None:
        self.classifier = load_classifier(Path(context.artifacts[CLASSIFIER_ARTIFACT]))

    # np.ndarray: a hint MLflow takes as "validate by the signature" (uint8 tensor in, named
    # float columns out, declared in save_pyfunc), which a type hint could not express.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        task = self.classifier.config.get("task", "classification")
        if task not in TASKS:
            return own_task_answers(self.classifier, model_input)
        images = as_images(model_input, int(self.classifier.config.get("in_chans", 3)))
        if self.classifier.config.get("task", "classification") == "detection":
            return detections(self.classifier, images)
        probabilities = torch.softmax(self.classifier.logits(images), dim=1).numpy().astype(np.float32)
        return pd.DataFrame(probabilities, columns=self.classifier.class_names)


@torch.no_grad()
def own_task_answers(model: Classifier, model_input) -> pd.DataFrame:
    """A user's task's answers: its predict's rows, one per input."""
    cfg = TrainConfig.from_dict(model.config)
    inputs = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
    task = task_named(model.task_reference or cfg.task)
    return pd.DataFrame(list(task.predict(model.model, inputs, cfg)))


def own_modules(reference: str | None) -> tuple[str, ...]:
    return (reference.partition(":")[0],) if reference else ()


def as_images(model_input, in_chans: int = 3) -> list:
    """A batch of uint8 arrays (N, H, W, 3), or (N, H, W) greyscale, as PIL images; a model
    of --in-chans N takes (N_images, H, W, N) stacks, each passed on as its array."""
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.to_numpy()
    array = np.asarray(model_input)
    if in_chans != 3:
        if array.ndim != 4 or array.shape[-1] != in_chans:
            raise ValueError(f"expected a batch of {in_chans}-channel images shaped (N, H, W, {in_chans}), "
                             f"got shape {array.shape}")
        return list(array)
    if array.ndim == 3 and array.dtype != object:
        array = array[..., None].repeat(3, axis=-1)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected a batch of RGB images shaped (N, H, W, 3), got shape {array.shape}")
    return [Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB") for image in array]


def save_pyfunc(target: Path, classifier_dir: Path, class_names: list[str], example: np.ndarray,
                extra_requirements: list[str] | None = None, task: str = "classification") -> Path:
    """An MLflow pyfunc model folder around a classifier folder (no server involved)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    # A detector's rows (boxes, labels, scores per image) are lists of each image's own length: no
    # column schema can say that, so its output is described in the model's docstring only; a
    # user's task's rows are its predict's own.
    outputs = Schema([ColSpec("float", name) for name in class_names]) if task == "classification" else None
    # uint8 RGB; a model of --in-chans N takes N channels of its stacks' own type; a user's task,
    # inputs of its example's type and number of dimensions
    shape = (-1, -1, -1, example.shape[-1]) if task in TASKS else (-1,) * example.ndim
    signature = ModelSignature(inputs=Schema([TensorSpec(example.dtype, shape)]), outputs=outputs)
    quiet = logging.getLogger("mlflow.pyfunc")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # not "Validating input example" twice per run
    try:
        mlflow.pyfunc.save_model(str(target), python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                                 artifacts={CLASSIFIER_ARTIFACT: str(classifier_dir)}, signature=signature,
                                 input_example=example, pip_requirements=requirements() + (extra_requirements or []))
    finally:
        quiet.setLevel(level)
    return target


def requirements() -> list[str]:
    """What serving needs (named here: MLflow's inference of them would load the model in a
    subprocess at every save). mlexp itself must be installed where the model is served."""
    pins = []
    for package in ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "pandas"):
        try:
            pins.append(f"{package}=={installed_version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def example_images(dataset, count: int = 1) -> np.ndarray:
    """The first images of a split, untransformed, as the batch a client would send: uint8
    RGB, or (--in-chans) the stacks as they are."""

    raw = getattr(dataset, "dataset", dataset)
    indices = list(getattr(dataset, "indices", range(len(dataset))))[:count]
    images = []
    for index in indices:
        if hasattr(raw, "images"):  # in-memory arrays (digits, synthetic), or a detection set's annotated files
            item = raw.images[index]
            path = getattr(item, "path", None)
            image = item if path is None else read_annotated(item, raw.in_chans) if hasattr(item, "bands") else \
                load_stack(path) if is_stack(path, raw.in_chans) else Image.open(path)
        else:
            image = raw.loader(raw.samples[index][0])
        images.append(np.asarray(image) if isinstance(image, np.ndarray) and image.ndim == 3 and
                      image.shape[-1] != 3 else np.asarray(to_rgb8(as_pil(image))))
    return np.stack(images)


def read_annotated(item, in_chans: int):
    from mlexp.tasks.detection.images import read_pixels  # here: only a detector's example needs it

    return read_pixels(item, in_chans)


def as_pil(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


# --- finding a logged model again ---------------------------------------------------------------
def resolve(client, uri: str):
    """The mlexp logged model a URI names: runs:/RUN_ID[/best|final], models:/NAME@ALIAS,
    models:/NAME/VERSION or models:/MODEL_ID. One clear MlexpError when there is none, or when
    it is not a model mlexp logged."""
    from mlflow.exceptions import MlflowException

    try:
        model = _logged_model(client, uri)
    except MlflowException as error:
        raise MlexpError(f"--model {uri}: not found ({first_line(error)})") from None
    if model.tags.get(MODEL_TAG) != MODEL_TYPE:
        raise MlexpError(f"--model {uri} is not an mlexp image classifier (logged model {model.model_id} "
                         f"{model.name!r} has no {MODEL_TAG} tag): mlexp evaluates the models its runs log")
    return model


def _logged_model(client, uri: str):
    if uri.startswith("runs:/"):
        run_id, _, name = uri.removeprefix("runs:/").partition("/")
        run = client.get_run(run_id)
        name = name.strip("/") or "best"
        found = [m for m in client.search_logged_models([run.info.experiment_id],
                                                        filter_string=f"source_run_id = '{run_id}'")
                 if m.name == name]
        if not found:
            raise MlexpError(f"--model {uri}: run {run_id} has no logged model {name!r} (mlexp runs log "
                             "'best' and 'final' when they finish)")
        return found[0]
    if not uri.startswith("models:/"):
        raise MlexpError(f"--model {uri!r}: expected runs:/RUN_ID, models:/NAME@ALIAS, models:/NAME/VERSION "
                         "or models:/MODEL_ID")
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in rest:
        version = client.get_model_version(*rest.split("/", 1))
    else:
        return client.get_logged_model(rest)
    # The registry keeps the logged model's id (MLflow 3), or at least its models:/MODEL_ID source.
    model_id = version.model_id or (version.source.removeprefix("models:/")
                                    if (version.source or "").startswith("models:/m-") else None)
    if not model_id:
        raise MlexpError(f"--model {uri} is not an mlexp image classifier (version {version.version} of "
                         f"{version.name!r} was registered from {version.source}, not from a logged model)")
    return client.get_logged_model(model_id)


def download_classifier(client, model, folder: Path) -> Path:
    """The classifier folder (weights and configuration) of a logged model, downloaded."""
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location.rstrip('/')}/artifacts/{CLASSIFIER_ARTIFACT}",
        dst_path=str(folder), tracking_uri=client.tracking_uri))


def staged_model(tracker, name: str, config: dict, class_names: list[str], weights: dict, example: np.ndarray) -> Path:
    """A pyfunc model folder for the tracker to log (in its outbox: no copy is made)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"mlexp-{name}-"))
    try:
        classifier = write_classifier(scratch / CLASSIFIER_ARTIFACT, config, class_names, weights)
        target = tracker.staging_dir(f"model-{name}")
        target.rmdir()  # save_model creates it
        task = config.get("task", "classification")
        return save_pyfunc(target, classifier, class_names, example,
                           plugin_requirements(config.get("backbone", ""), config.get("plugins"),
                                               own_modules(task_reference(task))), task=task)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
