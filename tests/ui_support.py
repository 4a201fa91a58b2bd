"""Helpers for the browser tests: Debian's Chromium, free ports, and the UIs as process groups started
through the Makefile (`make ui`, `make mlflow-ui`), exactly what a person runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
APT_TIMEOUT_S = 900


def ensure_chromium() -> str | None:
    """Install Debian's `chromium` with apt when it is missing. Returns None when /usr/bin/chromium is
    there, else why it could not be installed (the caller fails in CI and skips elsewhere)."""
    if CHROMIUM.exists():
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"{CHROMIUM} is missing and installing it needs root: apt-get install -y chromium"
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and this machine has no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Another apt/dpkg may be running on a shared machine: wait for its lock rather than fail.
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    deadline = time.monotonic() + APT_TIMEOUT_S
    for command in (["apt-get", *lock, "update", "-q"],
                    ["apt-get", *lock, "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` did not finish within {APT_TIMEOUT_S}s"
        if done.returncode != 0:
            return f"`{' '.join(command)}` failed ({done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}"
    return None if CHROMIUM.exists() else f"apt-get installed chromium but {CHROMIUM} is still missing"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_command(target: str, port: int) -> list[str]:
    """`make <target> PORT=<port>` with this interpreter's environment and without `make install`, which
    may reach the package index (the test session's environment is installed already)."""
    stamp = ".venv/.installed"
    return ["make", "--no-print-directory", "-o", stamp, f"STAMP={stamp}", target, f"PORT={port}",
            f"BIN={Path(sys.executable).parent}"]


# dagster dev maps SIGTERM to its SIGINT handler, which is "ignore" when the test runner was started in the
# background by a non-interactive shell: exec the command with SIGINT back at its default, so that stop() shuts
# it down cleanly (a preexec_fn would do the same but is unsafe in a process with threads).
_WITH_DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execvp(sys.argv[1], sys.argv[1:])"]


class UiProcess:
    """A server in its own process group, its output in a log file; `stop()` ends the whole group."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path, url: str):
        self.name, self.command, self.url, self.log = name, command, url, log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen([*_WITH_DEFAULT_SIGINT, *command], cwd=REPO, env=env,
                                        stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}) before {what}: "
                                   f"{' '.join(self.command)}\n{self.log_tail()}")
            try:
                if ready():
                    return
            except (OSError, ValueError):  # not listening yet, or a half-started server's reply
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: no {what} within {timeout_s:.0f}s\n{self.log_tail()}")

    def terminate(self) -> None:
        """Ask the whole process group to shut down (make, dagster dev and its webserver, daemon, code
        servers, run workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, grace_s: float = 30.0) -> None:
        """terminate(), then SIGKILL whatever of the group is left after `grace_s`: nothing outlives a test."""
        self.terminate()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(self.process.pid):
            self.process.poll()
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log_file.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True  # (an exited but unreaped leader counts too: stop() polls it)


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


def graphql(base: str, query: str) -> dict:
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"]


LOCATIONS_QUERY = """{ workspaceOrError { ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def loaded_code_location(base: str) -> str | None:
    """The name of the Dagster code location once it has loaded; a load error is raised with its message."""
    entries = graphql(base, LOCATIONS_QUERY)["workspaceOrError"]["locationEntries"]
    for entry in entries:
        error = entry.get("locationOrLoadError") or {}
        if error.get("__typename") == "PythonError":
            raise AssertionError(f"code location {entry['name']} failed to load: {error['message']}")
    loaded = [entry["name"] for entry in entries if entry["loadStatus"] == "LOADED"]
    return loaded[0] if loaded else None


def mlflow_ids(base: str, experiment: str, run_name: str) -> tuple[str, str]:
    """(experiment id, run id) from MLflow's REST API: the server is ready once it finds the run."""
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}",
                                timeout=10) as response:
        experiment_id = json.loads(response.read())["experiment"]["experiment_id"]
    body = json.dumps({"experiment_ids": [experiment_id],
                       "filter": f"attributes.run_name = '{run_name}'"}).encode()
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        runs = json.loads(response.read()).get("runs", [])
    if not runs:
        raise urllib.error.URLError(f"no run named {run_name!r} in experiment {experiment!r}")
    return experiment_id, runs[0]["info"]["run_id"]
