"""Crash points for fault-injection tests: SIGKILL this process at a chosen moment.

`MLEXP_FAULT="POINT=VALUE"` kills the process the moment POINT is reached with VALUE:
`step=N` (after optimizer step N), `logged=N` (step N's metrics logged, not yet
group-committed to the outbox), `eval=N` (inside the N-th evaluation of this process),
`checkpoint=EPOCH` (a resume checkpoint written, not yet handed to the outbox),
`upload=ARTIFACT/FILE` (before that file's upload), `manifest=EPOCH` (before a
checkpoint's manifest is published), `logged_model=NAME` (the logged model created on the
server, its files not yet uploaded), `status=STATUS` (everything sent but the run's final
status). A real SIGKILL, as from the OOM killer or a lost
node: nothing gets to clean up. Unset (always, outside tests), a check costs one comparison.
"""

from __future__ import annotations

import os
import signal

_FAULT = os.environ.get("MLEXP_FAULT") or None


def crash_point(point: str, value: object) -> None:
    if _FAULT is not None and _FAULT == f"{point}={value}":
        os.kill(os.getpid(), signal.SIGKILL)
