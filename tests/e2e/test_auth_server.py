"""A team server with authentication: MLflow's own basic-auth app, real accounts. Credentials
given in the URI or in the environment train, and are found nowhere afterwards: not in the
server's store or artifacts, the outbox, the local logs or anything printed. A user with READ
permission is refused in one line, with no run left behind."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlexp.tracking.local_server import start_local_server, stop_local_server
from tests.e2e.test_team_server import postgres_uri  # noqa: F401 - the fixture
from tests.faults import TINY
from tests.helpers import run_mlexp, subprocess_env

ADMIN = ("admin", "Adm1n-" + secrets.token_hex(6))
ALICE = ("alice", "Al1ce-" + secrets.token_hex(6))  # creates the experiment: MANAGE on it
BOB = ("bob", "B0b-" + secrets.token_hex(6))  # the server's default permission on it: READ


def call(uri: str, endpoint: str, body: dict, who: tuple[str, str]) -> dict:
    token = base64.b64encode(f"{who[0]}:{who[1]}".encode()).decode()
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture
def auth_server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = {ADMIN[0]}\n"
        f"admin_password = {ADMIN[1]}\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    proc, uri = start_local_server(root, app_name="basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    for user in (ALICE, BOB):
        call(uri, "users/create", {"username": user[0], "password": user[1]}, ADMIN)
    yield root, uri
    stop_local_server(proc)


def files_holding(secret: str, *folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("*")
            if path.is_file() and secret.encode() in path.read_bytes()]


def test_credentials_train_and_are_written_nowhere(auth_server, tmp_path, monkeypatch):
    root, uri = auth_server
    host = uri.removeprefix("http://")
    work, outbox = tmp_path / "work", tmp_path / "outbox"
    work.mkdir()
    env = subprocess_env(f"http://{ALICE[0]}:{ALICE[1]}@{host}", MLEXP_OUTBOX_DIR=str(outbox))
    args = ["train", *TINY, "--epochs", "1", "--log-models", "false", "--system-metrics", "false"]
    printed = []
    in_uri = run_mlexp([*args, "--experiment", "team"], env, work)  # in $MLFLOW_TRACKING_URI
    printed.append(in_uri.stdout + in_uri.stderr)
    assert in_uri.returncode == 0, printed[-1][-2000:]
    env.pop("MLFLOW_TRACKING_URI")
    in_option = run_mlexp([*args, "--experiment", "team", "--tracking-uri", f"http://{ALICE[0]}:{ALICE[1]}@{host}"],
                          env, work)
    printed.append(in_option.stdout + in_option.stderr)
    assert in_option.returncode == 0, printed[-1][-2000:]
    in_env = run_mlexp([*args, "--experiment", "team", "--tracking-uri", uri],
                       {**env, "MLFLOW_TRACKING_USERNAME": ALICE[0], "MLFLOW_TRACKING_PASSWORD": ALICE[1]}, work)
    printed.append(in_env.stdout + in_env.stderr)
    assert in_env.returncode == 0, printed[-1][-2000:]

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    assert len(runs) == 3 and {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.params["tracking_uri"] for run in runs} <= {"", uri}
    assert not any(ALICE[1] in text for text in printed)
    assert not files_holding(ALICE[1], root, outbox, work)  # the store, the artifacts, outboxes, live logs

    # a READ user: one line naming the permission, exit 2, nothing created
    bob = run_mlexp([*args, "--experiment", "team", "--tracking-uri", f"http://{BOB[0]}:{BOB[1]}@{host}"], env, work)
    lines = [line for line in bob.stderr.splitlines() if line.strip()]
    assert bob.returncode == 2 and len(lines) == 1, bob.stderr[-2000:]
    assert "refused runs/create to user 'bob' (403 permission denied): it needs EDIT on the experiment" in lines[0]
    assert BOB[1] not in bob.stdout + bob.stderr
    assert len(client.search_runs([client.get_experiment_by_name("team").experiment_id])) == 3
    # the owner's sweep (children inherit the credentials), compare and register; the READ user's refused
    owner = {**env, "MLFLOW_TRACKING_URI": f"http://{ALICE[0]}:{ALICE[1]}@{host}"}
    tiny = ["--backbones", "test_resnet", "--inits", "scratch", "--seeds", "1", "--img-size", "16", "--epochs", "1",
            "--calibrate", "false", "--system-metrics", "false", "--experiment", "team-sweep"]
    done = [run_mlexp(["sweep", *tiny], owner, work), run_mlexp(["compare", "--experiment", "team-sweep"], owner, work),
            run_mlexp(["register", "--experiment", "team-sweep", "--name", "team-model"], owner, work)]
    assert [outcome.returncode for outcome in done] == [0, 0, 0], [o.stdout[-1500:] + o.stderr[-1500:] for o in done]
    printed += [outcome.stdout + outcome.stderr for outcome in done]
    reader = {**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": BOB[0], "MLFLOW_TRACKING_PASSWORD": BOB[1]}
    for args_, needed in ((["sweep", *tiny, "--seeds", "2"], "refused runs/create to user 'bob'"),
                          (["register", "--experiment", "team-sweep", "--name", "team-model"],
                           "refused model-versions/create to user 'bob' (403 permission denied): it needs EDIT")):
        refused = run_mlexp(args_, reader, work)
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 2 and len(lines) == 1 and needed in lines[0], refused.stderr[-2000:]
    assert not any(ALICE[1] in text for text in printed)
    assert not files_holding(ALICE[1], root, outbox, work)
    # a wrong password: one line, the password never echoed
    wrong = run_mlexp([*args, "--tracking-uri", f"http://{ALICE[0]}:not-{ALICE[1]}@{host}"], env, work)
    assert wrong.returncode == 2 and "401" in wrong.stderr and ALICE[1] not in wrong.stdout + wrong.stderr


def test_a_database_uri_s_password_connects_and_is_written_nowhere(postgres_uri, tmp_path):
    """mlexp straight on PostgreSQL (no server), its password required (scram-sha-256) and given
    in the URI: the run trains, and the password is in no param, file, outbox or printed line."""
    secret = "Pg-" + secrets.token_hex(6)
    port = postgres_uri.rsplit(":", 1)[1].split("/")[0]
    psql = sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))[-1]
    run_sql = [psql, "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-d", "mlflow", "-v", "ON_ERROR_STOP=1", "-c"]
    subprocess.run([*run_sql, f"ALTER USER postgres PASSWORD '{secret}'"], check=True, capture_output=True)
    hba = subprocess.run([*run_sql, "SHOW hba_file"], check=True, capture_output=True, text=True).stdout
    hba_file = Path(next(line.strip() for line in hba.splitlines() if line.strip().endswith("pg_hba.conf")))
    hba_file.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    subprocess.run([*run_sql, "SELECT pg_reload_conf()"], check=True, capture_output=True)
    uri = postgres_uri.replace("postgres@", f"postgres:{secret}@")
    work, outbox = tmp_path / "work", tmp_path / "outbox"
    work.mkdir()
    env = subprocess_env(uri, MLEXP_OUTBOX_DIR=str(outbox))
    done = run_mlexp(["train", *TINY, "--epochs", "1", "--log-models", "false", "--system-metrics", "false",
                      "--experiment", "pg", "--tracking-uri", uri], env, work)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert secret not in done.stdout + done.stderr and "postgres:***@" in done.stdout
    wrong = run_mlexp(["train", *TINY, "--epochs", "1", "--tracking-uri", uri.replace(secret, "not-it")], env, work)
    assert wrong.returncode == 2 and "not-it" not in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("pg").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["tracking_uri"] == postgres_uri.replace(
        "postgres@", "postgres:***@")
    assert not files_holding(secret, work, outbox, hba_file.parent)  # the database's own files included
