"""What an outbox says about its run: which MLflow run it is and where it goes (`RunInfo`),
and what the server does not have yet (`Pending`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunInfo:
    local_id: str
    run_id: str | None
    tracking_uri: str | None
    experiment: str | None
    experiment_id: str | None
    run_name: str | None
    parent_local_id: str | None
    tags: dict[str, str]
    start_time: int
    offline: bool
    status: str | None
    end_time: int | None
    status_sent: bool


@dataclass
class Pending:
    """What the server does not have yet."""

    metrics: int
    params_tags: int
    files: int
    file_bytes: int
    status: str | None  # a status still to be sent
    rejected: int

    @property
    def empty(self) -> bool:
        return not (self.metrics or self.params_tags or self.files or self.status)

    def describe(self) -> str:
        parts = []
        if self.metrics:
            parts.append(f"{self.metrics} metric point(s)")
        if self.params_tags:
            parts.append(f"{self.params_tags} param(s)/tag(s)")
        if self.files:
            parts.append(f"{self.files} artifact operation(s) ({self.file_bytes / 1e6:.1f} MB)")
        if self.status:
            parts.append(f"the status {self.status}")
        if self.rejected:
            parts.append(f"{self.rejected} item(s) the server refused for good (see `mlexp sync --dry-run`)")
        return ", ".join(parts) or "nothing"
