"""A real MONAI Label server running this app, on loopback, for the tests and for scripts/bench_app.py.

``python -m monailabel.main start_server`` in its own process group, logging to a file, driven by
MONAI Label's own client (the same REST calls as 3D Slicer). Failures raise ``ServerFailed`` with
the end of the server's log, which pytest reports as a failed test.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
APP = PROJECT / "apps" / "fewshot"
STARTUP_TIMEOUT = 240
INGEST_TIMEOUT = 180


class ServerFailed(AssertionError):
    pass


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


PORT_BLOCK = 1000  # ports each pytest-xdist worker searches


def _ports():
    """Candidate ports: a block of its own per pytest-xdist worker, below the kernel's ephemeral range.

    bind(0) hands out a port from the ephemeral range, where any outgoing connection (the other worker's
    requests to its own server) can take it between that check and the server's own bind. Below that range
    only listeners take ports, and each worker looks in its own block; the start within the block follows
    the process id, so two test runs on one machine rarely try the same ports first."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    base = _ephemeral_start() - PORT_BLOCK * (index + 1)
    if base < 1024:  # an unusual ephemeral range: no room below it, so the kernel's choice
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                yield s.getsockname()[1]
    offset = os.getpid() % PORT_BLOCK
    while True:
        for i in range(PORT_BLOCK):
            yield base + (offset + i) % PORT_BLOCK


_candidates = _ports()


def free_port() -> int:
    """A loopback port nothing listens on now (checked by binding it), from this worker's own block."""
    for _ in range(PORT_BLOCK):
        port = next(_candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free loopback port in this worker's block of {PORT_BLOCK} below {_ephemeral_start()}")


class Server:
    """``python -m monailabel.main start_server`` in its own process group, logging to a file."""

    def __init__(self, studies: Path, models_dir: Path, log: Path, preset: str = "random-tiny", extra=(), env=None):
        self.studies, self.models_dir, self.log_path, self.preset = studies, models_dir, log, preset
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = [("preset", preset), ("models_dir", str(models_dir)), *extra]
        self.cmd = [
            sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]
        for key, value in conf:
            self.cmd += ["-c", key, value]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, cwd=PROJECT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self):
        from monailabel.client import MONAILabelClient

        tmp = self.log_path.parent / "client"
        tmp.mkdir(exist_ok=True)
        return MONAILabelClient(self.url, tmpdir=str(tmp))

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                return self.client().info()
            except Exception:
                time.sleep(0.5)
        raise ServerFailed(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def bank(self) -> dict:
        return self.client().info()["models"]["fewshot"]["support_bank"]

    def wait_bank_idle(self, timeout: float = INGEST_TIMEOUT) -> dict:
        """Until nothing is queued, resyncing, ingesting or warming the strategy's cache."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            bank = self.bank()
            work = bank["ingestion"]
            if work["state"] == "idle" and not work["pending"] and not work["resync_pending"]:
                return bank
            time.sleep(0.25)
        raise ServerFailed(f"bank still busy after {timeout} s: {self.bank()['ingestion']}\n{self.log()[-3000:]}")

    def wait_for_log(self, pattern: str, timeout: float = INGEST_TIMEOUT, start: int = 0) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            match = re.search(pattern, self.log()[start:])
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise ServerFailed(f"no log line matching {pattern!r}:\n{self.log()[-3000:]}")

    def request(self, method: str, selector: str, files: dict | None = None, fields: dict | None = None,
                body: dict | None = None) -> tuple[int, str]:
        """The same REST calls as MONAILabelClient (and Slicer), returning the status instead of raising."""
        from monailabel.client.client import MONAILabelUtils

        if files is None:
            status, data, _, _ = MONAILabelUtils.http_method(method, self.url, selector, body)
        else:
            status, data, _, _ = MONAILabelUtils.http_multipart(
                method, self.url, selector, fields if fields is not None else {"params": "{}"}, files,
            )
        return status, data.decode(errors="replace") if isinstance(data, bytes) else str(data)

    def manifest(self) -> dict:
        return json.loads((self.studies / ".fewshot" / f"bank-{self.preset}" / "manifest.json").read_text())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


# ---------------------------------------------------------------- snapshots, mounts, request tables

CLEANUP_TIMEOUT = 10.0  # background tasks remove a successful request's files just after its response


def run_quietly(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def mount_tmpfs(path: Path, megabytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return run_quietly("mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path))


def remount(path: Path, read_only: bool) -> None:
    assert run_quietly("mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(path)), f"cannot remount {path}"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under the datastore (its index, labels, the bank in .fewshot) -> sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def temp_files(server: Server) -> set[str]:
    """What is in the server's temporary folder. Start-up leaves a few files there (MONAI Label's
    logging config, torch's cache folder), so tests compare with a listing taken before."""
    return {p.name for p in Path(server.env["TMPDIR"]).iterdir()}


class Unchanged:
    """Snapshot of the datastore (bank included) and the temporary folder; ``check()`` asserts both are
    as they were (waiting, bounded, for the background tasks that remove a finished request's files)."""

    def __init__(self, server: Server):
        server.wait_bank_idle()
        self.server = server
        self.digest, self.temp = tree_digest(server.studies), temp_files(server)

    def check(self) -> None:
        deadline = time.time() + CLEANUP_TIMEOUT
        while temp_files(self.server) != self.temp and time.time() < deadline:
            time.sleep(0.1)
        assert temp_files(self.server) == self.temp, "left in the temporary folder"
        self.server.wait_bank_idle()
        assert tree_digest(self.server.studies) == self.digest


def expect(server: Server, cases, hide_temp_path: bool = False) -> None:
    """``cases``: (method, selector, files or None, form fields or JSON body, status, words);
    ``hide_temp_path``: an answer that names the server's temporary folder fails too."""
    tmp = server.env["TMPDIR"] if hide_temp_path else None
    failures = []
    for method, selector, files, data, status, words in cases:
        if files is None:
            got, body = server.request(method, selector, body=data)
        else:
            got, body = server.request(method, selector, files=files, fields=data)
        if got != status or words not in body or (tmp is not None and tmp in body):
            failures.append(f"{method} {selector[:80]}: {got} {body[:300]} (expected {status} with {words!r})")
    assert not failures, "\n".join(failures)


def expected_dice(predicted: np.ndarray, saved: np.ndarray, segmented: dict, slices=None) -> dict:
    """What a review (/info's ``reviews``) must say, computed here: Dice per segmented label over the annotated
    slices (along the third axis), a label absent from both left out, to 4 decimals."""
    if slices is not None:
        predicted, saved = predicted[:, :, slices], saved[:, :, slices]
    out = {}
    for name, value in segmented.items():
        p, t = predicted == value, saved == value
        if p.any() or t.any():
            out[name] = round(2.0 * int((p & t).sum()) / (int(p.sum()) + int(t.sum())), 4)
    return out
