"""`python -m mlexp` for the tests, without paying its imports every time.

Each mlexp process spends about 5 of its 8-9 seconds importing torch, torchvision, timm, MLflow's
SQL store, scikit-learn and matplotlib before it reads its first option; the suite starts a few
hundred of them. A warm starter is one process per test process that has imported those
libraries once and forks a child for each command. The child is a real process of its own
(own pid, environment, working folder, stdin/stdout/stderr, exit status or signal) that runs
`mlexp` exactly as `python -m mlexp` does (`runpy`, the same `sys.argv` and `sys.path[0]`), and
imports mlexp itself fresh: only the third-party imports are shared, and none of them has run
any computation or started a thread (checked) before the fork.

What cannot be shared falls back to a plain `python -m mlexp` process: an environment that
differs from the starter's in a variable those libraries read when they are imported (threads,
hub, tqdm, Python's own), or `MLEXP_TESTS_COLD=1` (every command cold, as a user starts it).
Commands that a test kills or reads while they run, sweep children, torchrun/accelerate launch
and the entry-point tests stay plain processes."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

# The libraries an mlexp command imports, heaviest first (about 5 s on 2 cores).
SHARED_IMPORTS = ("torch", "torchvision", "timm", "accelerate", "safetensors.torch", "sklearn.metrics",
                  "sklearn.model_selection", "sklearn.datasets", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
                  "mlflow.pytorch", "matplotlib.pyplot", "PIL.Image")

# Variables the shared libraries read when imported: a command whose value differs from the
# starter's runs cold. (MLflow reads its own variables when called; the tracking URI, user and
# password of each command reach it.)
READ_AT_IMPORT = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH", "PYTORCH", "CUDA", "NCCL", "HF_", "HUGGINGFACE",
                  "TRANSFORMERS", "TQDM_", "MPL", "PYTHON", "LD_", "MALLOC", "ACCELERATE", "MLFLOW_LOGGING",
                  "MLFLOW_CONFIGURE_LOGGING")


def as_from_a_terminal() -> None:
    """A command gets Ctrl-C as a user's shell delivers it: SIGINT neither blocked nor ignored,
    whatever earlier in-process code (another test's) left in this pytest process. (Python keeps
    an inherited SIG_IGN; a launcher started so would train on through a test's Ctrl-C.)"""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def imported_the_same(env: dict[str, str], starter_env: dict[str, str]) -> bool:
    names = {name for name in (*env, *starter_env) if name.startswith(READ_AT_IMPORT)}
    return all(env.get(name) == starter_env.get(name) for name in names)


def read_line(conn: socket.socket) -> str:
    """One line the starter sent ("" if it ended first)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            return ""
        line += chunk
    return line.decode()


class WarmProcess:
    """A warm-started command, as the `subprocess.Popen` of a plain one: its pid (signals reach
    it as they would), `stdout` when asked for, and its exit status (negative: the signal that
    ended it) told by the starter."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str]) -> None:
        self.conn, self.pid, self.args = conn, pid, args
        self.returncode: int | None = None
        self.stdout = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.conn], [], [], 0)[0]:
            self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.conn.settimeout(timeout)
            try:
                said = read_line(self.conn)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            if not said:
                raise RuntimeError(f"the warm starter ended while {self.args[:2]} ran (its error is above)")
            self.returncode = int(said)
            self.conn.close()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """The rest of stdout, once the command has ended (its text read where the caller left it)."""
        rest: list[str] = []
        reader = threading.Thread(target=lambda: rest.append(self.stdout.read()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(timeout)
        return rest[0], None

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmStarter:
    """The client side: one starter process per test process, started on first use."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.socket_path = ""
        self.lock = threading.Lock()

    def run(self, args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """As `subprocess.run([python, -m, mlexp, *args], capture_output=True, text=True)`."""
        if not self.ready_for(env):
            return subprocess.run([sys.executable, "-m", "mlexp", *args], env=env, cwd=cwd, capture_output=True,
                                  text=True, timeout=timeout, preexec_fn=as_from_a_terminal)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = self.fork(args, env, cwd, out.fileno(), err.fileno())
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:  # as subprocess.run: the process is killed, then the caller told
                process.kill()
                process.wait(30)
                raise
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(["mlexp", *args], process.returncode,
                                               out.read().decode(errors="replace"), err.read().decode(errors="replace"))

    def popen(self, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen | WarmProcess:
        """As `subprocess.Popen([python, -m, mlexp, *args], stdout=PIPE, stderr=STDOUT, text=True)`."""
        if not self.ready_for(env):
            return subprocess.Popen([sys.executable, "-m", "mlexp", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, preexec_fn=as_from_a_terminal)
        reading, writing = os.pipe()
        try:
            process = self.fork(args, env, cwd, writing, writing)
        finally:
            os.close(writing)  # the child holds it now: the pipe ends when the child (and what it started) does
        process.stdout = open(reading, encoding="utf-8", errors="replace")  # noqa: SIM115 (the caller's to read)
        return process

    def fork(self, args: list[str], env: dict[str, str], cwd: Path, stdout: int, stderr: int) -> WarmProcess:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(self.socket_path)
        request = json.dumps({"args": args, "env": env, "cwd": str(cwd)}).encode()
        with open(os.devnull, "rb") as stdin:
            socket.send_fds(conn, [len(request).to_bytes(8, "big")], [stdin.fileno(), stdout, stderr])
        conn.sendall(request)
        return WarmProcess(conn, int(read_line(conn)), ["mlexp", *args])

    def ready_for(self, env: dict[str, str]) -> bool:
        if os.environ.get("MLEXP_TESTS_COLD") == "1":
            return False
        with self.lock:
            if self.process is None:
                self.start(env)
        return self.process.poll() is None and imported_the_same(env, self.env)

    def start(self, env: dict[str, str]) -> None:
        folder = tempfile.mkdtemp(prefix="mlexp-warm-")
        self.env, self.socket_path = dict(env), os.path.join(folder, "starter.sock")
        # stdin: a pipe only this test process holds, so the starter ends with it
        # Ctrl-C as from a terminal: the starter's Python then installs its KeyboardInterrupt
        # handler, and every child forked from it has it, as `python -m mlexp` from a shell has
        self.process = subprocess.Popen([sys.executable, __file__, self.socket_path], env=env, cwd=folder,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        preexec_fn=as_from_a_terminal)
        atexit.register(self.stop, folder)
        said = self.process.stdout.readline().strip()
        if said != "ready":  # every command then starts cold: slower, never wrong
            self.process.kill()
            self.process.wait()
            warnings.warn(f"mlexp's commands start cold in this test process: {said!r}", stacklevel=1)

    def stop(self, folder: str) -> None:
        self.process.stdin.close()  # the starter's signal to end
        self.process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def serve(socket_path: str) -> dict | None:
    """The starter: import, then fork a child per request, any number at once. Returns the
    request in a child, None in the starter when the test process has gone."""
    for name in SHARED_IMPORTS:
        importlib.import_module(name)
    if threading.active_count() != 1:  # a thread would not survive the fork: refuse, never half-work
        print(f"threads after the imports: {threading.enumerate()}", flush=True)
        return None
    gc.collect()
    gc.freeze()  # the children share these pages instead of copying them on their first collection
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(socket_path)
    listener.listen()
    print("ready", flush=True)
    running: dict[int, tuple[int, socket.socket]] = {}  # a child's pidfd (readable once it ended): pid, its caller
    while True:
        readable, _, _ = select.select([listener, sys.stdin, *running], [], [])
        if sys.stdin in readable:
            return None
        for pidfd in [fd for fd in readable if fd in running]:
            pid, conn = running.pop(pidfd)
            _, status = os.waitpid(pid, 0)
            with conn, contextlib.suppress(OSError):  # a caller that timed out has gone
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            os.close(pidfd)
        if listener in readable:
            conn, _ = listener.accept()
            header, fds, _, _ = socket.recv_fds(conn, 8, 3)
            size, body = int.from_bytes(header, "big"), b""
            while len(body) < size:
                body += conn.recv(size - len(body))
            pid = os.fork()
            if pid == 0:
                for fd, (_, caller) in running.items():
                    os.close(fd)
                    caller.close()
                listener.close()
                conn.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                return json.loads(body)
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            running[os.pidfd_open(pid)] = (pid, conn)


def run_as_python_m_mlexp(request: dict) -> None:
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # as `python -m` sets it
    sys.argv = ["-m", *request["args"]]  # runpy replaces argv[0] with the module's path
    runpy.run_module("mlexp", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    command = serve(sys.argv[1])
    if command is not None:
        run_as_python_m_mlexp(command)
