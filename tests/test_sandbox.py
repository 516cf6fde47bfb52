"""rewards/sandbox.py under attack: each limit holds, and every failure is a result with a reason."""

import os
import socket
import subprocess
import threading
import time

from rewards.sandbox import Limits, isolation_level, run_python

FAST = Limits(wall_s=60, cpu_s=2, memory_mb=256, processes=8, file_mb=1)  # a loose wall clock: the cores are shared


def test_a_plain_program_runs_and_prints():
    result = run_python("import math\nprint(math.factorial(5), input())", stdin="hi\n", limits=FAST)
    assert result.ok and result.reason == "ok" and result.stdout == "120 hi\n"


def test_failures_are_results_with_reasons():
    result = run_python("assert 1 + 1 == 3, 'arithmetic'", limits=FAST)
    assert not result.ok and result.reason.startswith("exit status 1: AssertionError: arithmetic")
    result = run_python("def broken(:", limits=FAST)
    assert not result.ok and "SyntaxError" in result.reason
    result = run_python("import sys; sys.exit(3)", limits=FAST)
    assert not result.ok and result.returncode == 3


def test_infinite_loop_stops_at_the_cpu_limit():
    # 1 s of CPU, with a wall clock loose enough for a machine whose cores are shared with others
    result = run_python("while True:\n    pass", limits=Limits(wall_s=120, cpu_s=1))
    assert not result.ok and result.reason == "cpu time limit" and result.seconds < 120


def test_sleeping_forever_stops_at_the_wall_clock():
    result = run_python("import time\ntime.sleep(60)", limits=Limits(wall_s=2, cpu_s=2))
    assert not result.ok and result.reason == "wall-clock limit" and result.seconds < 10


def test_memory_bomb_stops_at_the_memory_limit():
    result = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(10 * 2**20))", limits=FAST)
    assert not result.ok and result.reason == "memory limit"
    assert not run_python("x = bytearray(2**30)", limits=FAST).ok  # one allocation over the limit


def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    # Count how many processes the code can start before the limit refuses one.
    counting = ("import os, time\nn = 0\ntry:\n    for _ in range(1000):\n        if os.fork() == 0:\n"
                "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)")
    result = run_python(counting, limits=FAST)
    assert result.ok and 0 <= int(result.stdout) < FAST.processes
    # A real bomb: every child forks forever. It hits the wall clock and is killed whole.
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_python(bomb, limits=Limits(wall_s=3, cpu_s=2, processes=8))
    assert not result.ok
    if isolation_level() == "isolated":  # the namespace dies whole: soon nothing runs under a sandbox uid
        deadline = time.monotonic() + 10
        while _sandbox_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _sandbox_processes()


def _sandbox_processes() -> list[int]:
    uids = subprocess.run(["ps", "-eo", "uid="], capture_output=True, text=True).stdout.split()
    return [int(u) for u in uids if int(u) >= 200_000]


def test_writing_outside_the_working_directory_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')", limits=FAST)
    assert not result.ok and not target.exists()
    # a relative write lands in the fresh working directory, which is gone afterwards
    result = run_python("import os\nopen('here.txt', 'w').write('x')\nprint(os.getcwd())", limits=FAST)
    assert result.ok and not os.path.exists(os.path.join(result.stdout.strip(), "here.txt"))
    # the file-size limit
    result = run_python("open('big', 'wb').write(b'x' * 4 * 2**20)", limits=FAST)
    assert not result.ok and result.reason == "file size limit"


def test_no_network_connection_gets_out():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(4)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(server)))
    thread.start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')"
    result = run_python(code, limits=FAST)
    thread.join()
    server.close()
    assert not result.ok and accepted == [None]
    if isolation_level() == "isolated":  # a network namespace of its own: only a loopback device
        result = run_python("print(open('/proc/net/dev').read())", limits=FAST)
        assert result.ok and "lo:" in result.stdout and "eth" not in result.stdout


def _accept(server):
    try:
        return server.accept()[1]
    except OSError:
        return None


def test_environment_secrets_do_not_reach_the_code(monkeypatch):
    monkeypatch.setenv("SELFDISTILL_TEST_SECRET", "hunter2")
    code = ("import os, glob\nfound = 'hunter2' in repr(dict(os.environ))\n"
            "for path in glob.glob('/proc/*/environ'):\n    try:\n        found |= b'hunter2' in open(path, 'rb').read()\n"
            "    except OSError:\n        pass\nprint(found, sorted(os.environ))")
    result = run_python(code, limits=FAST)
    assert result.ok and result.stdout.startswith("False"), result.stdout
    assert "SELFDISTILL_TEST_SECRET" not in result.stdout


def test_endless_output_is_capped():
    result = run_python("while True:\n    print('x' * 1000)", limits=FAST)
    assert not result.ok and len(result.stdout) <= 65536


def test_a_broken_sandbox_is_a_zero_with_a_reason(monkeypatch):
    import rewards.sandbox as sandbox
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", lambda **_: (_ for _ in ()).throw(OSError("disk full")))
    result = run_python("print(1)", limits=FAST)
    assert not result.ok and result.reason == "sandbox error: OSError: disk full"


def test_without_namespaces_the_audit_hook_still_refuses_a_connection(monkeypatch):
    import rewards.sandbox as sandbox
    monkeypatch.setattr(sandbox, "isolation_level", lambda: "limited")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(4)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(server)))
    thread.start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)"
    result = run_python(code, limits=FAST)
    thread.join()
    server.close()
    assert result.level == "limited" and not result.ok and "network access is disabled" in result.reason
    assert accepted == [None]
    assert run_python("print(2 + 2)", limits=FAST).stdout == "4\n"  # the limited level runs ordinary code
