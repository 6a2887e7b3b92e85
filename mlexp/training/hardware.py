"""What the machine decides: precision, memory format, loader workers, cuDNN/TF32 settings,
and the peak memory a run used. Each `auto` option is resolved here, from the device's
capabilities, so the rules can be tested on any machine (they are pure functions of them)."""

from __future__ import annotations

import ctypes
import os
import resource

import torch

from mlexp.config import AUTO, TrainConfig

# The options whose `auto` this module resolves: each run logs what it became as effective.NAME.
RESOLVED = ("mixed_precision", "channels_last", "workers")
MAX_AUTO_WORKERS = 8  # past this, decoding rarely gains and each worker holds its prefetched batches


def choose_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """`--mixed-precision` resolved: bf16 on a GPU that supports it (no scaler needed), fp16
    (Accelerate adds the gradient scaler) on an older GPU, none on CPU and other devices."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if bf16_supported else "fp16"
    return "no"


def device_precision(requested: str) -> str:
    """choose_precision for this machine's accelerator."""
    if torch.cuda.is_available():
        return choose_precision(requested, "cuda", torch.cuda.is_bf16_supported())
    return choose_precision(requested, "cpu", False)


def is_convolutional(model: torch.nn.Module) -> bool:
    """More than one 2-D convolution: a CNN. ViTs and Swins have one (their patch embedding)."""
    return sum(isinstance(module, torch.nn.Conv2d) for module in model.modules()) > 1


# Families whose training runs faster in channels_last on a CPU (oneDNN's NHWC convolutions,
# no reorder around each one). Measured on an AVX2 EPYC, 2 threads, one AdamW step, NCHW time
# over channels_last time: resnet18 at 128 px 1.12-1.25 (resnet50 1.19, timm's test_resnet
# 1.30), and whole epochs on JPEGs 1.14. vgg16 goes the other way (0.74-0.85: its 7x7 classifier
# convolution on a tiny map), and ViTs and Swins have a single convolution to gain from.
CHANNELS_LAST_ON_CPU = frozenset({"resnet"})


def choose_channels_last(requested: str, device_type: str, convolutional: bool, family: str) -> bool:
    """`--channels-last` resolved: on a GPU, for CNNs (cuDNN's NHWC kernels are faster, most of
    all under bf16/fp16); on a CPU, for the families measured faster with it (above). A rule,
    not a timing at start-up, so that the same command trains the same model every time."""
    if requested != "auto":
        return requested == "true"
    if device_type == "cuda":
        return convolutional
    return convolutional and family in CHANNELS_LAST_ON_CPU


def worker_count(cfg: TrainConfig, built_in: bool, environ: dict[str, str] | None = None,
                 cpus: int | None = None) -> int:
    """`--workers` resolved, per training process: 0 for in-memory sets (nothing to decode;
    worker processes would only add copies); else this process's share of the CPUs: the
    threads a sweep launcher gave it (OMP_NUM_THREADS), or the CPUs over the processes
    `accelerate launch`/torchrun start on this machine (LOCAL_WORLD_SIZE), up to 8."""
    if cfg.workers != AUTO:
        return cfg.workers
    if built_in:
        return 0
    environ = os.environ if environ is None else environ
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    share = environ.get("OMP_NUM_THREADS")
    if share and share.isdigit() and int(share) > 0:
        cpus = min(cpus, int(share))
    else:
        cpus //= max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(MAX_AUTO_WORKERS, cpus))


def configure_cuda() -> None:
    """TF32 matmuls and convolutions (Ampere and later: ~8x the fp32 rate, the precision
    bf16 training has anyway) and cuDNN's benchmark mode (fixed input sizes: it picks the
    fastest kernels once). Nothing on CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


# glibc's mallopt parameters (malloc.h), and how much freed memory the heap may keep
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let the heap keep freed memory instead of giving it back to the kernel (glibc only).

    A training step frees and reallocates the same activation buffers every time. By default
    glibc maps big blocks fresh and unmaps them when freed, so the kernel hands them back
    zeroed, one page fault per 4 KiB: about 25,000 faults per resnet18 step at 128 px on CPU,
    800 with this (about 2% of the step). jemalloc and tcmalloc, which the CPU tuning guides
    for PyTorch recommend, keep freed memory the same way. The process's memory then stays
    at its peak instead of falling between steps. Returns whether it was applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                    and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator's own defaults
        return False


def cuda_settings() -> dict[str, str]:
    """What configure_cuda left set, for the run's params (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    return {"tf32": str(torch.backends.cuda.matmul.allow_tf32).lower(),
            "cudnn_benchmark": str(torch.backends.cudnn.benchmark).lower()}


def peak_memory_mb() -> dict[str, float]:
    """The process's peak resident memory, and its accelerator's peak allocation, in MiB."""
    peaks = {"perf/peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # KiB on Linux
    if torch.cuda.is_available():
        peaks["perf/peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks
