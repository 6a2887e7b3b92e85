"""A team server with authentication: MLflow's own basic-auth app on a real PostgreSQL (its
runs and its accounts both), real accounts. Credentials given in the URI or in the environment
train, and are found nowhere afterwards: not in the server's store or artifacts, the outbox,
the local logs or anything printed. A user with EDIT on an experiment sweeps, compares,
registers and syncs what an outage kept; a user with READ is refused in one line, with no run
left behind."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.server import get_app_client

from tests.faults import TINY, RestartableServer, train_past_epoch_1
from tests.helpers import run_mlexp, subprocess_env

ADMIN = ("admin", "Adm1n-" + secrets.token_hex(6))
ALICE = ("alice", "Al1ce-" + secrets.token_hex(6))  # creates the experiments: MANAGE on them
BOB = ("bob", "B0b-" + secrets.token_hex(6))  # the server's default permission: READ
CAROL = ("carol", "C4rol-" + secrets.token_hex(6))  # granted EDIT on alice's sweep experiment


def call(uri: str, endpoint: str, body: dict, who: tuple[str, str]) -> dict:
    token = base64.b64encode(f"{who[0]}:{who[1]}".encode()).decode()
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture
def auth_server(postgres, tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    (root / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {postgres.new_database()}\n"
        f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n")  # as the README's team server: a checked login is remembered
    server = RestartableServer(root, backend=postgres.new_database(), app_name="basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    for user in (ALICE, BOB, CAROL):
        call(server.uri, "users/create", {"username": user[0], "password": user[1]}, ADMIN)
    yield root, server
    server.stop()


def files_holding(secret: str, *folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("*")
            if path.is_file() and secret.encode() in path.read_bytes()]


def as_user(env: dict[str, str], uri: str, who: tuple[str, str]) -> dict[str, str]:
    return {**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": who[0], "MLFLOW_TRACKING_PASSWORD": who[1]}


def test_credentials_train_and_are_written_nowhere(auth_server, postgres, tmp_path, monkeypatch):
    root, server = auth_server
    uri = server.uri
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
    # an EDIT user on alice's experiment: a sweep (claims, heartbeats, children that inherit the
    # credentials), compare, register, and a run that an outage left in its outbox, synced
    sweep_experiment = client.create_experiment("team-sweep")  # alice's: she manages it
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    get_app_client("basic-auth", uri).grant_user_permission(CAROL[0], "experiment", sweep_experiment, "EDIT")
    editor = {**env, "MLFLOW_TRACKING_URI": f"http://{CAROL[0]}:{CAROL[1]}@{host}"}
    tiny = ["--backbones", "test_resnet", "--inits", "scratch", "--seeds", "1", "--img-size", "16", "--epochs", "1",
            "--calibrate", "false", "--system-metrics", "false", "--experiment", "team-sweep"]
    done = [run_mlexp(["sweep", *tiny], editor, work), run_mlexp(["compare", "--experiment", "team-sweep"], editor, work),
            run_mlexp(["register", "--experiment", "team-sweep", "--name", "team-model"], editor, work)]
    assert [outcome.returncode for outcome in done] == [0, 0, 0], [o.stdout[-1500:] + o.stderr[-1500:] for o in done]
    printed += [outcome.stdout + outcome.stderr for outcome in done]
    proc, seen = train_past_epoch_1("team-sweep", 2, 16, {**as_user(env, uri, CAROL), "MLEXP_GRACE_S": "3"}, work)
    server.stop()
    seen.append(proc.communicate(timeout=300)[0])  # trained through the outage, its results kept
    assert proc.returncode == 0 and "does not have everything yet" in "".join(seen), "".join(seen)[-3000:]
    server.start()
    run_id = "".join(seen).split("mlexp: run ", 1)[1].split(":", 1)[0]
    synced = run_mlexp(["sync", "--all"], as_user(env, uri, CAROL), work)  # and whatever the sweep left waiting
    assert synced.returncode == 0 and f"({run_id}): sent" in synced.stdout, synced.stdout + synced.stderr
    printed += ["".join(seen), synced.stdout + synced.stderr]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
    assert client.get_run(run_id).info.status == "FINISHED"
    runs = {run.info.run_name: run.info.status for run in client.search_runs([sweep_experiment])}
    assert list(runs.values()) == ["FINISHED"] * 3, runs  # the sweep's parent and child, the outage's run
    # the READ user's sweep and register: one line each, nothing created
    for args_, needed in ((["sweep", *tiny, "--seeds", "2"], "refused runs/create to user 'bob'"),
                          (["register", "--experiment", "team-sweep", "--name", "team-model"],
                           "refused model-versions/create to user 'bob' (403 permission denied): it needs EDIT")):
        refused = run_mlexp(args_, as_user(env, uri, BOB), work)
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 2 and len(lines) == 1 and needed in lines[0], refused.stderr[-2000:]
    assert len(client.search_runs([sweep_experiment])) == 3
    dumped = subprocess.run([postgres.bin_dir / "pg_dumpall", "-h", "127.0.0.1", "-p", str(postgres.port),
                             "-U", "postgres"], check=True, capture_output=True).stdout
    for secret in (ALICE[1], CAROL[1]):
        assert not any(secret in text for text in printed)
        assert not files_holding(secret, root, outbox, work)
        assert secret.encode() not in dumped  # the server's runs and accounts (passwords are hashed)
    # a wrong password: one line, the password never echoed
    wrong = run_mlexp([*args, "--tracking-uri", f"http://{ALICE[0]}:not-{ALICE[1]}@{host}"], env, work)
    assert wrong.returncode == 2 and "401" in wrong.stderr and ALICE[1] not in wrong.stdout + wrong.stderr


def test_a_database_uri_s_password_connects_and_is_written_nowhere(postgres, tmp_path):
    """mlexp straight on PostgreSQL (no server), as a role whose password is required
    (scram-sha-256) and given in the URI: the run trains, and the password is in no param,
    file, outbox or printed line."""
    secret, role = "Pg-" + secrets.token_hex(6), f"trainer_{secrets.token_hex(4)}"
    postgres.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}'")
    bare = postgres.new_database(owner=role)
    hba_file = Path(postgres.sql("SHOW hba_file"))
    rules = hba_file.read_text()
    hba_file.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + rules)  # the first match decides
    postgres.sql("SELECT pg_reload_conf()")
    uri = bare.replace(f"{role}@", f"{role}:{secret}@")
    work, outbox = tmp_path / "work", tmp_path / "outbox"
    work.mkdir()
    env = subprocess_env(uri, MLEXP_OUTBOX_DIR=str(outbox))
    refused_bare = run_mlexp(["train", *TINY, "--epochs", "1", "--tracking-uri", bare], env, work)
    assert refused_bare.returncode == 2, refused_bare.stderr  # the password is required
    done = run_mlexp(["train", *TINY, "--epochs", "1", "--log-models", "false", "--system-metrics", "false",
                      "--experiment", "pg", "--tracking-uri", uri], env, work)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert secret not in done.stdout + done.stderr and f"{role}:***@" in done.stdout
    wrong = run_mlexp(["train", *TINY, "--epochs", "1", "--tracking-uri", uri.replace(secret, "not-it")], env, work)
    assert wrong.returncode == 2 and "not-it" not in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("pg").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["tracking_uri"] == bare.replace(f"{role}@", f"{role}:***@")
    assert not files_holding(secret, work, outbox, postgres.data)  # the database's own files included
