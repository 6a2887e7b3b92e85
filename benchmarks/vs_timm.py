"""mlexp against timm's own train.py: the same model, folder, recipe and workers, side by side.

timm's train.py is not part of the timm package: pass its path from a copy of the
pytorch-image-models repository (the same timm version as installed is best). Both train
the model from scratch on the same ImageFolder with the same batch size, image size, epochs,
optimizer (AdamW, cosine schedule stepped every update, no warmup), label smoothing,
augmentation (random-resized crop, flip 0.5, colour jitter 0.4, the model's interpolation),
worker count and memory format (mlexp's `auto` choice for the model, told to timm as
--channels-last); mlexp also tracks everything to a live local `mlflow server`. The two
alternate, pair after pair (who goes first alternates too).

Training throughput is each tool's own figure for an epoch's training phase (images / the
seconds from the epoch's first batch request to its last update; validation left out):
mlexp's printed epoch time (its `epoch/time_s`) over its full batches, timm's average update
time. The first epoch (worker start-up, first allocations) is left out when there are more. Accuracy: each run's final
validation top-1.

The tracking server is a local process on this machine. A team's server runs elsewhere, so
by default it runs at nice 19 here (as in tracking_overhead.py): it gets the CPU the training
leaves idle. `--server-nice 0` measures the co-located server as it is.

    python benchmarks/vs_timm.py --timm-train ~/pytorch-image-models/train.py
        # CPU: resnet18 at 128 px on a folder of real JPEG photos (benchmarks/photo_folder.py)
    python benchmarks/vs_timm.py --timm-train PATH --seeds 1,2 --img-size 64 --epochs 8
        # accuracy parity: one run of each tool per seed
    python benchmarks/vs_timm.py --timm-train PATH --model resnet50 --img-size 224 --batch-size 256 \\
        --mixed-precision bf16 --data /data/imagenette   # a GPU machine

Needs scikit-image for the generated folder (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.photo_folder import make_photo_folder  # noqa: E402
from mlexp.tracking.local_server import start_local_server, stop_local_server  # noqa: E402

TOOLS = ("mlexp", "timm")
# timm logs each epoch's last update as: Train: E [ N/N (100%)] ... (AVG_S s, RATE/s) ...
MLEXP_EPOCH = re.compile(r"^epoch +\d+ .*val loss \S+ acc (\S+) +([\d.]+)s", re.MULTILINE)
TIMM_LAST_UPDATE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+) .*?\(([\d.]+)s,\s*([\d.]+)/s\)")


def model_interpolation(model: str, img_size: int) -> str:
    """The interpolation of the model's timm data config: mlexp's own choice, told to timm."""
    from mlexp.config import TrainConfig
    from mlexp.data.transforms import data_config

    return data_config(TrainConfig(backbone=model, init="scratch", img_size=img_size))["interpolation"]


def mlexp_run(args, data: Path, seed: int, uri: str, workdir: Path, name: str) -> dict:
    command = [sys.executable, "-m", "mlexp", "train", "--backbone", args.model, "--init", "scratch",
               "--data", str(data), "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
               "--epochs", str(args.epochs), "--optimizer", "adamw", "--lr", str(args.lr),
               "--weight-decay", str(args.weight_decay), "--scheduler", "cosine", "--warmup-epochs", "0",
               "--scratch-lr-mult", "1", "--scratch-epochs-mult", "1", "--scratch-warmup-mult", "1",
               "--scratch-wd-mult", "1", "--llrd-decay", "1", "--label-smoothing", "0.1", "--hflip", "0.5",
               "--color-jitter", "0.4", "--train-crop", "random-resized", "--workers", str(args.workers),
               "--mixed-precision", args.mixed_precision, "--calibrate", "false", "--seed", str(seed),
               "--experiment", "vs-timm", "--run-name", name, "--offline", str(args.offline).lower()]
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               MLEXP_OUTBOX_DIR=str(workdir / "outbox"))
    done = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mlexp {name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    # mlexp prints each epoch as: epoch N  train loss .. acc ..  val loss .. acc A  T.Ts
    epochs = MLEXP_EPOCH.findall(done.stdout)
    images = len(list((data / "train").glob("*/*"))) // args.batch_size * args.batch_size  # full batches
    return {"rates": [images / float(seconds) for _, seconds in epochs], "val_acc": float(epochs[-1][0]) * 100}


def timm_run(args, data: Path, seed: int, workdir: Path, name: str) -> dict:
    output = workdir / "timm-output" / name
    command = [sys.executable, str(args.timm_train), "--data-dir", str(data), "--train-split", "train",
               "--val-split", "val", "--model", args.model, "--num-classes", str(args.num_classes),
               "--img-size", str(args.img_size), "-b", str(args.batch_size), "--epochs", str(args.epochs),
               "--opt", "adamw", "--lr", str(args.lr), "--weight-decay", str(args.weight_decay),
               "--sched", "cosine", "--sched-on-updates", "--warmup-epochs", "0", "--min-lr", "0",
               "--smoothing", "0.1", "--hflip", "0.5", "--color-jitter", "0.4",
               "--train-interpolation", model_interpolation(args.model, args.img_size), "-j", str(args.workers),
               "--seed", str(seed), "--output", str(output), "--experiment", name, "--checkpoint-hist", "1",
               "--log-interval", "1000000", "--device", args.device]
    if args.channels_last:
        command += ["--channels-last"]
    if args.device == "cuda":
        command += ["--pin-mem"]
        if args.mixed_precision != "no":
            command += ["--amp", "--amp-dtype", {"bf16": "bfloat16", "fp16": "float16"}[args.mixed_precision]]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"timm {name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    by_epoch: dict[int, float] = {}
    for match in TIMM_LAST_UPDATE.finditer(done.stdout + done.stderr):
        epoch, update, updates = int(match[1]), int(match[2]), int(match[3])
        if update + 1 == updates:  # the epoch's last update: its average covers the whole epoch
            by_epoch[epoch] = float(match[5])
    with open(output / name / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {"rates": [by_epoch[epoch] for epoch in sorted(by_epoch)], "val_acc": float(rows[-1]["eval_top1"])}


def steady(rates: list[float]) -> float:
    """An epoch's throughput past warm-up: the median of the epochs after the first."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (pytorch-image-models)")
    parser.add_argument("--data", type=Path, help="an ImageFolder with train/ and val/ (default: a generated "
                        "folder of JPEG photos, benchmarks/photo_folder.py)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--workers", type=int, help="loader workers for both (default: mlexp's auto choice)")
    parser.add_argument("--mixed-precision", default=None, choices=("no", "bf16", "fp16"),
                        help="default: bf16 on a GPU, no on CPU")
    parser.add_argument("--pairs", type=int, default=3, help="throughput: runs of each tool, alternating")
    parser.add_argument("--train-images", type=int, default=80, help="generated folder: training images per class")
    parser.add_argument("--server-nice", type=int, default=19, help="the local tracking server's nice value")
    parser.add_argument("--offline", action="store_true", help="mlexp records offline (no uploads during "
                        "training): its loop against timm's, without the server's share of the CPU")
    parser.add_argument("--seeds", help="accuracy parity instead: one run of each tool per seed, e.g. 1,2")
    args = parser.parse_args()

    import timm
    import torch

    from mlexp.config import TrainConfig
    from mlexp.models.catalogue import resolve_backbone
    from mlexp.training import hardware

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision is None:
        args.mixed_precision = hardware.device_precision("auto")
    if args.workers is None:
        args.workers = hardware.worker_count(TrainConfig(), built_in=False)
    # mlexp's auto memory format for this model here; timm is told the same (its --channels-last)
    spec = resolve_backbone(args.model, "scratch")
    convolutional = hardware.is_convolutional(timm.create_model(spec.timm_name, **spec.create_kwargs(args.img_size)))
    args.channels_last = hardware.choose_channels_last("auto", args.device, convolutional, spec.family)
    with tempfile.TemporaryDirectory(prefix="mlexp-vs-timm-") as folder:
        workdir = Path(folder)
        data = args.data or make_photo_folder(workdir / "photos", train=args.train_images,
                                              val=max(1, args.train_images // 4))
        args.num_classes = len([path for path in (data / "train").iterdir() if path.is_dir()])
        print(f"{args.model} at {args.img_size}px, batch {args.batch_size}, {args.epochs} epochs, "
              f"{args.workers} workers, {args.device} {args.mixed_precision}, channels_last {args.channels_last}, "
              f"data {data}, "
              f"server at nice {args.server_nice}{', mlexp offline' if args.offline else ''}", flush=True)
        server, uri = start_local_server(workdir / "server", nice=args.server_nice)
        try:
            if args.seeds:
                parity(args, data, uri, workdir)
            else:
                throughput(args, data, uri, workdir)
        finally:
            stop_local_server(server)


def throughput(args, data: Path, uri: str, workdir: Path) -> None:
    rates: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    for index in range(args.pairs):
        order = TOOLS if index % 2 == 0 else tuple(reversed(TOOLS))
        for tool in order:
            name = f"{tool}-pair{index + 1}"
            result = (mlexp_run(args, data, 42, uri, workdir, name) if tool == "mlexp"
                      else timm_run(args, data, 42, workdir, name))
            rates[tool].append(steady(result["rates"]))
            print(f"  {name}: {rates[tool][-1]:.1f} samples/s (epochs: "
                  f"{', '.join(f'{rate:.1f}' for rate in result['rates'])})", flush=True)
        print(f"pair {index + 1}: mlexp {rates['mlexp'][-1]:.1f}, timm {rates['timm'][-1]:.1f} samples/s, "
              f"ratio {rates['mlexp'][-1] / rates['timm'][-1]:.3f}", flush=True)
    ours, theirs = statistics.median(rates["mlexp"]), statistics.median(rates["timm"])
    print(f"\nmedian of {args.pairs}: mlexp {ours:.1f} samples/s, timm train.py {theirs:.1f} samples/s, "
          f"ratio mlexp/timm {ours / theirs:.3f}")


def parity(args, data: Path, uri: str, workdir: Path) -> None:
    accuracy: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    for seed in [int(seed) for seed in args.seeds.split(",")]:
        for tool in TOOLS:
            name = f"{tool}-seed{seed}"
            result = (mlexp_run(args, data, seed, uri, workdir, name) if tool == "mlexp"
                      else timm_run(args, data, seed, workdir, name))
            accuracy[tool].append(result["val_acc"])
        print(f"seed {seed}: final val top-1 mlexp {accuracy['mlexp'][-1]:.1f}%, "
              f"timm {accuracy['timm'][-1]:.1f}%", flush=True)
    print(f"\nmean over seeds {args.seeds}: mlexp {statistics.mean(accuracy['mlexp']):.1f}%, "
          f"timm train.py {statistics.mean(accuracy['timm']):.1f}% (difference "
          f"{statistics.mean(accuracy['mlexp']) - statistics.mean(accuracy['timm']):+.1f} points)")


if __name__ == "__main__":
    main()
