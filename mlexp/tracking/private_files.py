"""Files only their owner reads. An outbox holds a run's params, tags, metrics and checkpoints,
which may be private: its folders are 0700 and its files 0600 whatever the umask, as W&B's and
ClearML's offline stores are private to their user."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_FOLDER, PRIVATE_FILE = 0o700, 0o600


def private_folder(folder: Path, root: Path) -> None:
    """`folder` (made if new) and the folders between it and `root` (included): owner only."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in (folder, *folder.parents):
        os.chmod(path, PRIVATE_FOLDER)
        if path == root or root not in path.parents:
            break


def private_tree(folder: Path) -> None:
    """Files 0600 and folders 0700 below `folder` (written by code that knows nothing of the outbox)."""
    os.chmod(folder, PRIVATE_FOLDER)
    for parent, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(parent, name), PRIVATE_FOLDER)
        for name in files:
            os.chmod(os.path.join(parent, name), PRIVATE_FILE)
