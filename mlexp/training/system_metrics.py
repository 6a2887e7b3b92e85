"""System metrics of a training run: CPU, memory, disk, network, and GPUs where NVIDIA's
management library (nvidia-ml-py, the `mlexp[gpu]` extra) is installed.

MLflow's own monitors take the samples and the names are MLflow's (`system/cpu_utilization_percentage`,
`system/gpu_0_memory_usage_megabytes`, ...), so the run page's System metrics tab shows them.
Unlike MLflow's monitor, which writes straight to the server and drops what an outage loses,
these go through the run's tracker (its outbox) like every other metric.
"""

# Imported where used: `mlflow` (its monitors), because a training run imports this module and its first
# step should not wait for them (only --system-metrics does).
from __future__ import annotations

import logging
import os
import threading

import psutil

INTERVAL_S = 10.0  # MLflow's own default sampling interval


def interval_s() -> float:
    return float(os.environ.get("MLEXP_SYSTEM_METRICS_S", INTERVAL_S))


def make_monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        monitors.append(GPUMonitor())
    except (ImportError, RuntimeError):  # no nvidia-ml-py, or no NVIDIA GPU: CPU metrics only
        pass
    return monitors


class SystemMetrics:
    """A daemon thread that samples every interval_s() and logs one point per sample, at step
    1, 2, 3, ... (`start_step` continues a resumed run's numbering)."""

    def __init__(self, tracker, start_step: int = 0):
        self.tracker = tracker
        self.step = start_step
        self.monitors = make_monitors()
        psutil.cpu_percent()  # its first reading has nothing to compare with: start the clock now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlexp-system-metrics", daemon=True)

    def start(self) -> "SystemMetrics":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def sample(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            values.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        return {f"system/{name}": float(value) for name, value in values.items()}

    def _run(self) -> None:
        while not self._stop.wait(interval_s()):
            try:
                values = self.sample()
                self.step += 1
                self.tracker.log_metrics(values, step=self.step)
            except Exception:  # noqa: BLE001 - a failed sample (a vanished disk) is no reason to stop training
                continue
