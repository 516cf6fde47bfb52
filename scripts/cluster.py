"""Start and stop a real two-node Ray cluster on one machine, for trying `ray job submit` locally.

    python scripts/cluster.py up     # head at 127.0.0.2, a second node at 127.0.0.3, dashboard on 127.0.0.1
    python scripts/cluster.py down   # stops exactly the processes of this cluster

The head's dashboard (which also serves the Jobs API) listens on 127.0.0.1 only; usage stats are
off. Every port is fixed from `--port-base` so that the cluster does not collide with another Ray
on the machine, and the cluster keeps its own `--temp-dir`. `down` stops the processes whose
command line names that temp dir, and their children, and nothing else: unlike a bare `ray stop`,
it leaves every other Ray instance on the machine running.

Run it with the venv's Python: the nodes' PATH starts with that venv's `bin/`, so that a job's
entrypoint (`selfdistill train ...`) is found.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

HEAD_IP, WORKER_IP, DASHBOARD_HOST = "127.0.0.2", "127.0.0.3", "127.0.0.1"


def node_ports(base: int, index: int) -> dict[str, int]:
    """The fixed ports of node `index` (0 = head) for a cluster whose GCS listens on `base`."""
    first = base + 10 + 10 * index
    return {"--node-manager-port": first, "--object-manager-port": first + 1,
            "--dashboard-agent-listen-port": first + 2, "--dashboard-agent-grpc-port": first + 3,
            "--runtime-env-agent-port": first + 4, "--metrics-export-port": first + 5,
            "--min-worker-port": base + 100 + 200 * index, "--max-worker-port": base + 299 + 200 * index}


def all_ports(base: int, dashboard_port: int) -> list[int]:
    """Every port the cluster binds, worker ranges included (to check that they are free)."""
    ports = [base, base + 1, dashboard_port]
    for index in (0, 1):
        p = node_ports(base, index)
        ports += [v for k, v in p.items() if "worker-port" not in k]
        ports += list(range(p["--min-worker-port"], p["--max-worker-port"] + 1))
    return ports


def node_environment(python: str) -> dict[str, str]:
    # Token authentication on every node (Ray's own default only for some ways of starting a node):
    # a client on this machine finds the token in ~/.ray/auth_token.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env["PATH"] = f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _ray(python: str, args: list[str], env: dict[str, str]):
    command = [str(Path(python).parent / "ray"), "start", *args, "--disable-usage-stats", "--log-style", "record"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")


def _flags(ports: dict[str, int]) -> list[str]:
    return [item for key, value in ports.items() for item in (key, str(value))]


def up(temp_dir: Path, base: int, dashboard_port: int, head_cpus: int, worker_cpus: int, python: str) -> dict:
    """Starts the head and the second node; returns what `down` and a client need. Each node has
    its own temp dir under `temp_dir`: sharing one, each node's log monitor would also forward the
    other's actor logs, and every actor line would reach the driver twice."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = node_environment(python)
    subprocess.run([str(Path(python).parent / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True)  # creates ~/.ray/auth_token when there is none
    try:
        _ray(python, ["--head", "--node-ip-address", HEAD_IP, "--port", str(base), "--ray-client-server-port",
                      str(base + 1), "--dashboard-host", DASHBOARD_HOST, "--dashboard-port", str(dashboard_port),
                      "--num-cpus", str(head_cpus), "--temp-dir", str(temp_dir / "head"),
                      *_flags(node_ports(base, 0))], env)
        _ray(python, ["--address", f"{HEAD_IP}:{base}", "--node-ip-address", WORKER_IP, "--num-cpus", str(worker_cpus),
                      "--temp-dir", str(temp_dir / "node2"), *_flags(node_ports(base, 1))], env)
    except BaseException:
        down(temp_dir)
        raise
    info = {"gcs_address": f"{HEAD_IP}:{base}", "dashboard": f"http://{DASHBOARD_HOST}:{dashboard_port}",
            "temp_dir": str(temp_dir)}
    (temp_dir / "cluster.json").write_text(json.dumps(info, indent=1))
    return info


def cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes whose command line names `temp_dir`, and all their descendants (the workers
    rename themselves `ray::...` and no longer name it)."""
    marker = str(temp_dir)
    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.parents()}  # this command and whatever started it (a shell, make)
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        parts = process.info["cmdline"] or []
        if process.pid not in ours and any(p.endswith(marker) or marker + os.sep in p for p in parts):
            roots.append(process)
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def down(temp_dir: Path, grace_s: float = 10.0) -> int:
    """SIGTERM to every process of the cluster, then SIGKILL to what is left after `grace_s`;
    returns how many processes there were."""
    processes = cluster_processes(temp_dir)
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--temp-dir", default=os.environ.get("SELFDISTILL_CLUSTER_DIR", "/tmp/selfdistill-cluster"),
                        help="Ray's temp dir for this cluster (logs, sockets); names the processes `down` stops")
    parser.add_argument("--port-base", type=int, default=6379, help="GCS port; the nodes' ports follow it")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and Jobs API port on 127.0.0.1")
    parser.add_argument("--head-cpus", type=int, default=2)
    parser.add_argument("--worker-cpus", type=int, default=2)
    parser.add_argument("--grace-s", type=float, default=10.0,
                        help="down: seconds the processes get to exit after SIGTERM before SIGKILL")
    args = parser.parse_args(argv)
    temp_dir = Path(args.temp_dir).resolve()
    if args.action == "down":
        count = down(temp_dir, args.grace_s)
        print(f"stopped {count} processes of the cluster in {temp_dir} (its logs stay there)")
        return 0
    if cluster_processes(temp_dir):
        raise SystemExit(f"error: a cluster is already running in {temp_dir}; `down` it first")
    info = up(temp_dir, args.port_base, args.dashboard_port, args.head_cpus, args.worker_cpus, sys.executable)
    print(f"cluster up: head {HEAD_IP} + node {WORKER_IP}; GCS {info['gcs_address']}\n"
          f"  submit:  ray job submit --address {info['dashboard']} --working-dir . -- selfdistill train CONFIG\n"
          f"  stop:    {Path(sys.executable).name} scripts/cluster.py down --temp-dir {temp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
