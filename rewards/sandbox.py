"""The only place model-written code runs: a Python subprocess with every resource bounded.

`run_python(source)` returns a `SandboxResult`; it never raises for anything the code does. Each
run gets:

- a wall-clock limit (the parent kills the whole process group) and a CPU-time limit (RLIMIT_CPU);
- a memory limit (RLIMIT_AS), a process-count limit (RLIMIT_NPROC), a file-size limit (RLIMIT_FSIZE),
  few open files (RLIMIT_NOFILE) and no core dumps;
- a fresh temporary working directory, its HOME, deleted afterwards;
- a clean environment (PATH, HOME, LANG only): none of the trainer's variables, so no secrets;
- no network.

How well that holds depends on what the machine allows, in two levels:

`isolated` (root, with util-linux `unshare`; the CI machines and most containers): the code runs in
new mount, network and PID namespaces. The network namespace has only a loopback device that is
down, so nothing can be reached. The file system is read-only except a private tmpfs on /tmp,
/var/tmp and /dev/shm, which holds the working directory and vanishes with the namespace. /proc
shows only the sandbox's own processes. The code runs as a uid of its own (not root, not the
trainer's user), so RLIMIT_NPROC counts only the sandbox's processes: a fork bomb stops at the limit
and cannot starve anyone else's processes, and the PID namespace dies whole when the run ends.

`limited` (an unprivileged user without namespaces): the same resource limits, and a best effort
for the rest. The network is refused by an audit hook inside the interpreter (socket creation,
connect, bind and address lookups raise), which ordinary code cannot undo but native code could
bypass. RLIMIT_NPROC counts all of the user's processes, so it is set to the user's current count
plus the limit. Files the user can write outside the working directory stay writable. Run untrusted
code only on a machine that gets `isolated`.
"""

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Exit codes the child uses to say why the code stopped (an unhandled exception is 1, as usual).
EXIT_MEMORY = 113
EXIT_SETUP = 114
EXIT_CPU = 115
SANDBOX_UID_BASE = 200_000
"""The isolated level runs each sandbox as uid SANDBOX_UID_BASE + 100·(parent pid mod 100000) + (a counter
mod 100): a uid no account uses, so RLIMIT_NPROC counts the sandbox's own processes only."""

_counter = itertools.count(1)  # next() is atomic under the GIL: code_tests runs sandboxes from threads


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512
    processes: int = 16
    file_mb: int = 16
    open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    ok: bool
    """The code ran to the end and exited with status 0."""
    reason: str
    """'ok', or why not: 'wall-clock limit', 'cpu time limit', 'memory limit', 'file size limit',
    'killed by signal N', 'exit status N: <last line of stderr>', 'sandbox error: ...'."""
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    level: str
    """'isolated' or 'limited' (see the module docstring)."""


def isolation_level() -> str:
    """'isolated' when this process may create namespaces (root with `unshare`), else 'limited'."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        return "isolated"
    return "limited"


def run_python(source: str, *, limits: Limits = Limits(), stdin: str = "") -> SandboxResult:
    """Runs `source` as a Python program in the sandbox; every failure is a result, never an exception."""
    started = time.perf_counter()
    level = isolation_level()
    try:
        return _run(source, limits, stdin, level, started)
    except Exception as e:  # a broken sandbox is a zero score with a reason, not a crashed run
        return SandboxResult(False, f"sandbox error: {type(e).__name__}: {e}", None, "", "",
                             time.perf_counter() - started, level)


def _run(source: str, limits: Limits, stdin: str, level: str, started: float) -> SandboxResult:
    staging = Path(tempfile.mkdtemp(prefix="sandbox-"))
    try:
        (staging / "main.py").write_text(source, encoding="utf-8")
        child = [sys.executable, "-I", "-B", str(Path(__file__).resolve()), "--child", str(staging / "main.py"),
                 level, str(limits.cpu_s), str(limits.memory_mb), str(limits.processes), str(limits.file_mb),
                 str(limits.open_files)]
        if level == "isolated":
            uid = SANDBOX_UID_BASE + (os.getpid() % 100_000) * 100 + next(_counter) % 100
            child += [str(uid)]
            # --fork: the child is PID 1 of the new namespace; when it exits every process in it dies
            command = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", *child]
        else:
            command = child + [str(_user_process_count())]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}
        (staging / "stdin").write_text(stdin, encoding="utf-8")
        # Output goes to files, not pipes: RLIMIT_FSIZE caps them, so endless printing cannot fill our memory.
        with open(staging / "stdin", "rb") as i, open(staging / "stdout", "wb") as o, open(staging / "stderr", "wb") as e:
            process = subprocess.Popen(command, stdin=i, stdout=o, stderr=e, env=env, cwd=staging, start_new_session=True)
            try:
                process.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process)  # anything the code left running in its session
                process.wait()
        stdout, stderr = (_head(staging / name) for name in ("stdout", "stderr"))
        seconds = time.perf_counter() - started
        if timed_out:
            return SandboxResult(False, "wall-clock limit", None, stdout, stderr, seconds, level)
        return SandboxResult(process.returncode == 0, _reason(process.returncode, stderr), process.returncode,
                             stdout, stderr, seconds, level)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _head(path: Path, limit: int = 65536) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _kill_group(process: subprocess.Popen):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reason(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return "ok"
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    if returncode == EXIT_MEMORY or "MemoryError" in last:
        return "memory limit"
    if returncode == EXIT_SETUP:
        return f"sandbox error: {last}"
    if returncode in (EXIT_CPU, -signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "cpu time limit"
    if returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "File too large" in last:
        return "file size limit"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}: {last[:300]}"


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                count += 1
        except OSError:
            continue
    return count


# ------------------------------------------------------------------------------------------------
# The child side: runs as `python -I sandbox.py --child ...`, inside the namespaces when isolated.
# ------------------------------------------------------------------------------------------------

def _child(argv: list[str]) -> int:
    import pkgutil  # noqa: F401  (runpy needs it, and it must load before privileges are dropped)
    import resource
    import runpy
    program, level = Path(argv[0]), argv[1]
    cpu_s, memory_mb, processes, file_mb, open_files = (int(a) for a in argv[2:7])
    source = program.read_text(encoding="utf-8")
    try:
        if level == "isolated":
            workdir = _isolate(int(argv[7]))
        else:
            workdir = program.parent / "work"  # inside the parent's staging directory, which it deletes
            workdir.mkdir()
            processes += int(argv[7])  # RLIMIT_NPROC counts every process of this user here
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(PATH="/usr/bin:/bin", HOME=str(workdir), LANG="C.UTF-8", TMPDIR=str(workdir))
        limits = [(resource.RLIMIT_AS, memory_mb * 2**20), (resource.RLIMIT_NPROC, processes),
                  (resource.RLIMIT_FSIZE, file_mb * 2**20), (resource.RLIMIT_NOFILE, open_files),
                  (resource.RLIMIT_CORE, 0)]
        for kind, value in limits:
            resource.setrlimit(kind, (value, value))
        # SIGXCPU at the soft limit exits with a status that names the cause; the hard limit, a second
        # later, is SIGKILL for code stuck where Python cannot run the handler.
        signal.signal(signal.SIGXCPU, lambda *_: os._exit(EXIT_CPU))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        sys.addaudithook(_refuse_network)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_SETUP
    sys.argv = ["main.py"]
    try:
        runpy.run_path(str(program) if level != "isolated" else _copy_into(workdir, source), run_name="__main__")
    except MemoryError:
        print("MemoryError", file=sys.stderr)
        return EXIT_MEMORY
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def _isolate(uid: int) -> Path:
    """As root inside fresh namespaces: a private tmpfs for the scratch directories, everything else
    read-only, a working directory of the sandbox's own, then drop to an unprivileged uid."""
    import subprocess as sp
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            sp.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", path], check=True)
    _expose_interpreter()
    sp.run(["mount", "-o", "remount,bind,ro", "/"], check=True)
    workdir = Path(tempfile.mkdtemp(prefix="work-", dir="/tmp"))
    os.chown(workdir, uid, uid)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    return workdir


def _traversable_by_others(path: str) -> bool:
    """True when a uid with no relation to the owner can reach `path` (x on every ancestor, r on it)."""
    import stat
    parts = Path(path).resolve().parts
    for i in range(1, len(parts) + 1):
        mode = os.stat(Path(*parts[:i])).st_mode
        if not mode & stat.S_IXOTH or (i == len(parts) and not mode & stat.S_IROTH):
            return False
    return True


def _expose_interpreter():
    """The interpreter's library may sit under a private home (e.g. /root/.pyenv), out of reach for
    the sandbox uid: bind it read-only under the private /tmp and point sys.path there."""
    import subprocess as sp
    for i, prefix in enumerate(sorted({sys.base_prefix, sys.prefix})):
        # A prefix under a scratch directory (a venv in /tmp) is hidden by the private tmpfs by now;
        # the child needs only the standard library, which lives under the base prefix.
        if not os.path.isdir(prefix) or _traversable_by_others(prefix):
            continue
        target = f"/tmp/.python-{i}"
        os.makedirs(target)
        sp.run(["mount", "--bind", "-o", "ro", prefix, target], check=True)
        sys.path[:] = [target + entry[len(prefix):] if entry.startswith(prefix) else entry for entry in sys.path]
        for module in list(sys.modules.values()):  # packages already loaded (encodings, ...) find submodules there too
            search = getattr(module, "__path__", None)
            if isinstance(search, list):
                search[:] = [target + e[len(prefix):] if e.startswith(prefix) else e for e in search]


def _copy_into(workdir: Path, source: str) -> str:
    path = workdir / "main.py"
    path.write_text(source, encoding="utf-8")
    return str(path)


def _refuse_network(event: str, args) -> None:
    # Second layer under the network namespace; the only layer at the `limited` level.
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"):
        raise PermissionError(f"network access is disabled in the sandbox ({event})")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    sys.exit(_child(sys.argv[2:]))
