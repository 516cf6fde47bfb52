"""A real two-node Ray cluster on this machine (head 127.0.0.2, a second node 127.0.0.3), started and
stopped by scripts/cluster.py as the README says, and a training job sent to it with `ray job submit`.

The cluster has its own temp dir and ports, and is stopped by its processes' ids, never by a bare
`ray stop` (which would also stop every other Ray of this user on the machine)."""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from trainer.monitoring.metrics import read_metrics
from trainer.monitoring.report import FIGURES, load_run, reward_figure

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).parent / "ray"
JOB_TIMEOUT_S = 900


def _load_script():
    spec = importlib.util.spec_from_file_location("cluster_script", ROOT / "scripts" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cluster_script = _load_script()


def _port_free(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1", "127.0.0.2", "127.0.0.3"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port_base() -> tuple[int, int]:
    """A GCS port whose whole block (the nodes' ports and worker ranges), and a dashboard port, are free."""
    for base in range(21000 + (os.getpid() % 40) * 500, 60000, 1000):
        dashboard = base + 900
        if all(_port_free(p) for p in cluster_script.all_ports(base, dashboard)):
            return base, dashboard
    raise RuntimeError("no free block of ports for the test cluster")


def client_env() -> dict[str, str]:
    # The cluster uses token authentication; clients on this machine read ~/.ray/auth_token.
    return dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def cluster():
    # A short path: Ray's unix sockets live under it, and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="selfdistill-cluster-", dir="/tmp"))
    base, dashboard = free_port_base()
    command = [sys.executable, str(ROOT / "scripts" / "cluster.py"), "up", "--temp-dir", str(temp_dir),
               "--port-base", str(base), "--dashboard-port", str(dashboard), "--head-cpus", "2", "--worker-cpus", "1"]
    try:
        result = subprocess.run(command, env=client_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        yield json.loads((temp_dir / "cluster.json").read_text()) | {"dashboard_port": dashboard}
    finally:
        # a short grace: nothing of this throwaway cluster needs a clean shutdown
        subprocess.run([sys.executable, str(ROOT / "scripts" / "cluster.py"), "down", "--temp-dir", str(temp_dir),
                        "--grace-s", "2"],
                       env=client_env(), capture_output=True, timeout=120)
        left = cluster_script.cluster_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"cluster processes still running: {[p.pid for p in left]}"


def test_dashboard_and_jobs_api_listen_on_loopback_only(cluster):
    port = cluster["dashboard_port"]
    listening = [c.laddr for p in cluster_script.cluster_processes(Path(cluster["temp_dir"]))
                 for c in _listening(p) if c.laddr.port == port]
    assert listening and {address.ip for address in listening} == {"127.0.0.1"}, listening
    url = f"{cluster['dashboard']}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(url, timeout=30)  # token authentication: no token, no Jobs API
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {auth_token()}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200  # with the token, the Jobs API answers on loopback
    others = {"127.0.0.2", "127.0.0.3"} | {a.address for addresses in psutil.net_if_addrs().values()
                                           for a in addresses if a.family == socket.AF_INET and
                                           not a.address.startswith("127.")}
    for host in others:
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(5)
            s.connect((host, port))


def _listening(process: psutil.Process) -> list:
    try:
        return [c for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        return []


def ray_job(*args: str, timeout: float = 120) -> str:
    result = subprocess.run([str(RAY), "job", *args], env=client_env(), capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def auth_token() -> str:
    return (Path.home() / ".ray" / "auth_token").read_text().strip()


def wait_for_job(client, job_id: str) -> str:
    """Polls in this process (a `ray job status` process per poll costs seconds of CPU; one HTTP
    request does not)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if status.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
            return status.rsplit(".", 1)[-1]
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMEOUT"


def test_ray_job_submit_trains_with_learners_spread_over_both_nodes(cluster, toy_world, small_eval, tmp_path):
    address, job_id = cluster["dashboard"], f"selfdistill-test-{os.getpid()}"
    # Absolute paths: the job runs in a copy of the working dir (a multi-node run needs shared storage).
    ray_job("submit", "--address", address, "--working-dir", str(ROOT), "--submission-id", job_id, "--no-wait", "--",
            "selfdistill", "train", "configs/toy.yaml", "name=cluster", f"output_dir={tmp_path}",
            f"model.path={toy_world / 'model'}", f"data.train={toy_world / 'data' / 'addition' / 'train.jsonl'}",
            f"data.eval={small_eval}", "train.steps=3", "train.prompts_per_step=16", "learner.micro_batch=8",
            "train.eval_every=0", "log.samples_every=2", "learner.num=2", "ray.placement=spread")
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {auth_token()}"})
    status = wait_for_job(client, job_id)
    logs = client.get_job_logs(job_id)  # what `ray job logs` prints, without the command's own decoration
    assert status == "SUCCEEDED", logs[-5000:]

    run_dir = tmp_path / "cluster"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert "eval/addition/accuracy" in metrics[-1] and "time/step" in metrics[-1]
    assert list((run_dir / "tb").iterdir()) and (run_dir / "checkpoints" / "step_3" / "hf").is_dir()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(len(s["tokens"]) == len(s["student_logprobs"]) == len(s["teacher_logprobs"]) for s in samples)

    placement = json.loads((run_dir / "placement.json").read_text())
    assert placement["strategy"] == "spread"
    assert {entry["node_ip"] for entry in placement["learners"]} == {"127.0.0.2", "127.0.0.3"}

    # the driver's log reads as plain lines in `ray job logs`: no carriage returns, no ANSI codes
    assert "\r" not in logs and "\x1b[" not in logs
    assert re.search(r"trainer\.monitoring\.progress: step 3/3 \(100%\) \| [\d.e+-]+ s/step \| ETA 0m00s \| reward", logs), logs[-3000:]
    assert "learners on 127.0.0.2, 127.0.0.3" in logs or "learners on 127.0.0.3, 127.0.0.2" in logs

    # the report of this run: every file written and not empty, the curves are the metrics file's
    result = subprocess.run([str(RAY.parent / "selfdistill"), "report", str(run_dir)], env=client_env(),
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for name in [*FIGURES, "samples.html"]:
        assert (run_dir / "report" / name).stat().st_size > 1000, name
    raw = reward_figure([load_run(run_dir)]).axes[0].get_lines()[0]
    assert list(raw.get_ydata()) == [m["reward/mean"] for m in metrics if "reward/mean" in m]
