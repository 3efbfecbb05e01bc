"""A deployed federation on this machine: a SuperLink with TLS and SuperNode authentication and
N SuperNodes on loopback (real ``flower-superlink`` / ``flower-supernode`` processes of Flower
1.41), started and ended by process id; and what a caller reads of them (free ports, a port
that listens, a live process's peak resident set, a process's children).

Used by ``tests/test_deploy_processes.py`` and ``benchmarks/supernode_llama7b.py``. Every
message a SuperNode receives runs in a fresh ``ClientApp`` process, a child of the SuperNode
(:func:`children`); the ``ServerApp`` is a child of the SuperLink.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]          # the repository (flower_app/, scripts/)
BIN = Path(sys.executable).parent                   # flower-superlink, flower-supernode, flwr


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_port(port: int, timeout: float = 120.0) -> None:
    """Return once something listens on 127.0.0.1:``port``; :class:`TimeoutError` after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def vm_hwm(pid: int) -> int:
    """Peak resident set (bytes) of a live process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s descendants (none if it has ended)."""
    import psutil
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Federation:
    """A SuperLink (TLS, ``--enable-supernode-auth``) and ``nodes`` SuperNodes on loopback, ended by pid.

    ``folder`` receives the certificates (``certs/``), the Flower home, the SuperLink's
    database and one log per process (``logs/NAME.log``); every process runs in ``folder``
    with ``threads`` OpenMP threads.
    """

    def __init__(self, folder: Path, nodes: int, threads: int = 1):
        self.folder, self.nodes, self.procs = Path(folder), nodes, {}
        self.certs = self.folder / "certs"
        subprocess.run([ROOT / "scripts" / "make_certs.sh", self.certs, str(nodes)], check=True, capture_output=True)
        self.link, *self.node_ports = free_ports(1 + nodes)
        home = self.folder / "flwr_home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "federation"\n\n[superlink.federation]\naddress = "127.0.0.1:{self.link}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "OMP_NUM_THREADS": str(threads), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        (self.folder / "logs").mkdir()

    def spawn(self, name: str, args: list) -> subprocess.Popen:
        out = open(self.folder / "logs" / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([str(a) for a in args], env=self.env, cwd=self.folder, stdout=out,
                                            stderr=subprocess.STDOUT)
        return self.procs[name]

    def flwr(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([BIN / "flwr", *args], env=self.env, cwd=self.folder, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, node_configs: list[str]) -> None:
        """Start the SuperLink, register every SuperNode's key and start one SuperNode per node config."""
        c = self.certs
        self.spawn("superlink", [BIN / "flower-superlink", "--ssl-ca-certfile", c / "ca.crt", "--ssl-certfile",
                                 c / "server.pem", "--ssl-keyfile", c / "server.key", "--enable-supernode-auth",
                                 "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                 "--port", self.link, "--database", self.folder / "state.db"])
        wait_for_port(self.link)
        for k in range(self.nodes):
            done = self.flwr("supernode", "register", c / f"supernode_{k}.pub", "federation")
            if done.returncode != 0:
                raise RuntimeError(f"flwr supernode register {k} failed: {done.stdout}{done.stderr}")
        for k, nc in enumerate(node_configs):
            self.spawn(f"supernode{k}", [BIN / "flower-supernode", "--root-certificates", c / "ca.crt",
                                         "--superlink", f"127.0.0.1:{self.link}", "--auth-supernode-private-key",
                                         c / f"supernode_{k}", "--port", self.node_ports[k], "--node-config", nc])

    def run_app(self, app: Path, config_file: Path, out: Path, *, timeout: float, record_wait_s: float = 300,
                logs: tuple[str, ...] = ("superlink",)) -> dict:
        """``flwr run`` the Flower app at ``app`` on this federation (the RunConfig at
        ``config_file``, records to ``out``) and return the record it writes; a ``RuntimeError``
        with the output and the ends of ``logs`` if no record comes within ``record_wait_s``."""
        from ..records import RECORD_FILE

        done = self.flwr("run", app, "federation", "--stream", "--run-config",
                         f"config-file='{config_file}' overrides='' out-dir='{out}'", timeout=timeout)
        deadline = time.time() + record_wait_s
        while done.returncode == 0 and not (out / RECORD_FILE).exists() and time.time() < deadline:
            time.sleep(1)
        if not (out / RECORD_FILE).exists():
            tails = "\n----\n".join(self.log(name)[-3000:] for name in logs)
            raise RuntimeError(f"flwr run {app}: no {RECORD_FILE} in {out}\n{done.stdout[-4000:]}\n----\n"
                               f"{done.stderr[-2000:]}\n----\n{tails}")
        return json.loads((out / RECORD_FILE).read_text())

    def log(self, name: str) -> str:
        return (self.folder / "logs" / f"{name}.log").read_text()

    def stop(self) -> None:
        """SIGTERM to every process started here, SIGKILL to any still running after 20 s."""
        for p in self.procs.values():
            if p.poll() is None:
                os.kill(p.pid, 15)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, 9)
                p.wait()
