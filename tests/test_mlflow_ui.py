"""The MLflow UI opens on mlexp's runs, in its model-training view (headless Chromium).

MLflow 3's UI opens an experiment on its GenAI overview ("Traces 0", token usage) unless
the address asks for the model-training view. mlexp tags its experiments as model
development and prints an address that opens on the runs; this renders that address in
Debian's `chromium` (installed by `.ci/run`) against a real `mlflow server`.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess

import pytest

from mlexp.local_server import start_local_server, stop_local_server
from tests.faults import TINY
from tests.helpers import run_mlexp, subprocess_env

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_text(url: str) -> str:
    """The rendered page's visible text, after its scripts ran (virtual time: 20 s)."""
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("MLEXP_REQUIRE_CHROMIUM"),
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_printed_address_opens_the_experiment_on_its_runs(tmp_path):
    server, uri = start_local_server(tmp_path / "server")
    try:
        done = run_mlexp(["train", *TINY, "--epochs", "1", "--experiment", "ui-check", "--run-name", "ui-run"],
                         subprocess_env(uri), tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        [address] = re.findall(r"open it: (\S+) in a browser", done.stdout)
        assert address.endswith("?workflowType=machine_learning") and "/#/experiments/" in address
        shown = page_text(address)
        assert "ui-run" in shown and "1 matching run" in shown  # the runs table
        assert "Traces 0" not in shown and "Token Usage" not in shown  # not the GenAI overview
    finally:
        stop_local_server(server)
