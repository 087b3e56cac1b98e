"""The sandbox for generated code: hostile programs are contained, fail, and leave the host as
it was; ordinary programs run as usual.

The hostile programs first undo the in-process guards, as any code can (`UNGUARD`): those
guards are defence in depth, and what is tested here is the OS mechanisms underneath. A test
that needs a mechanism `sandbox_guarantees()` reports missing on this machine is skipped and
names it. No test here forks without bound or deletes anything outside its own tmp_path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.eval.sandbox import run_in_sandbox, sandbox_guarantees

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

UNGUARD = """\
import importlib, sys
for name in ("socket", "_socket", "subprocess", "_posixsubprocess", "ctypes", "_ctypes", "multiprocessing"):
    sys.modules.pop(name, None)
import os, shutil
importlib.reload(os)
importlib.reload(shutil)
"""


def require(*mechanisms: str) -> None:
    """Skip unless this machine enforces at least one of `mechanisms`."""
    guarantees = sandbox_guarantees()
    if not any(guarantees[m] for m in mechanisms):
        pytest.skip(f"not enforced on this machine: {' or '.join(mechanisms)} "
                    f"(sandbox_guarantees: {guarantees})")


def processes_with(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != b"Z":
            found.append(int(entry))
    return found


@pytest.fixture
def marker():
    """A unique string for hostile processes to carry in their command line; any such process
    still alive at the end of the test is killed (should containment ever fail)."""
    marker = f"scratchlm-sandbox-test-{uuid.uuid4().hex}"
    yield marker
    for pid in processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until_gone(marker: str, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# --------------------------------------------------------------------------- ordinary programs
def test_guarantees_name_each_mechanism():
    guarantees = sandbox_guarantees()
    assert set(guarantees) == {
        "wall_clock_timeout", "process_group_kill", "clean_environment", "memory_limit",
        "cpu_limit", "file_size_limit", "in_process_guards", "separate_uid", "nproc_limit",
        "network_namespace", "pid_namespace", "read_only_filesystem"}
    assert all(isinstance(v, bool) for v in guarantees.values())
    guarantees["separate_uid"] = not guarantees["separate_uid"]  # a copy: the cache is safe
    assert sandbox_guarantees() != guarantees


def test_a_correct_program_passes():
    result = run_in_sandbox("from __future__ import annotations\n"
                            "import math\n"
                            "assert __name__ == '__main__'\n"
                            "def f(x: list[int]) -> int:\n"
                            "    return sum(x)\n"
                            "assert f([1, 2]) == 3 and math.isclose(math.pi, 3.14159, rel_tol=1e-5)\n")
    assert result.passed and result.status == "passed", result
    assert 0 < result.seconds < 10


def test_a_failing_assert_fails_with_the_assertion_as_detail():
    result = run_in_sandbox("print('some output')\nassert 1 + 1 == 3, 'arithmetic is broken'\n")
    assert not result.passed
    assert result.status == "failed"
    assert result.detail == "AssertionError: arithmetic is broken"


def test_exit_codes_and_signals_are_reported():
    assert run_in_sandbox("raise SystemExit(3)").detail == "exit code 3"
    crash = run_in_sandbox(UNGUARD + "import ctypes\nctypes.string_at(0)\n")  # a segfault
    assert (crash.passed, crash.status, crash.detail) == (False, "killed", "killed by SIGSEGV")


def test_the_detail_is_one_short_line():
    result = run_in_sandbox("import sys\nsys.stderr.write('x' * 100_000 + '\\n\\n')\nraise SystemExit(1)\n")
    assert result.status == "failed"
    assert "\n" not in result.detail and 0 < len(result.detail) <= 300


def test_bad_limits_are_one_line_errors():
    with pytest.raises(ScratchLMError, match="timeout"):
        run_in_sandbox("pass", timeout_s=0)
    with pytest.raises(ScratchLMError, match="memory"):
        run_in_sandbox("pass", memory_mb=1)


def test_in_process_guards_stop_plain_code_from_reaching_out():
    for program in ("import socket", "import subprocess", "import os\nos.remove('x')",
                    "import shutil\nshutil.rmtree('.')", "import os\nos.kill(1, 9)"):
        result = run_in_sandbox(program)
        assert result.status == "failed", (program, result)


# --------------------------------------------------------------------------- hostile programs
def test_an_infinite_loop_times_out():
    start = time.monotonic()
    result = run_in_sandbox("while True:\n    pass\n", timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert "timed out" in result.detail
    assert time.monotonic() - start < 1.0 + 3.0


def test_a_program_that_ignores_signals_and_sleeps_times_out():
    program = UNGUARD + """
import signal, time
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
time.sleep(3600)
"""
    start = time.monotonic()
    result = run_in_sandbox(program, timeout_s=1.0)
    assert result.status == "timeout"
    assert time.monotonic() - start < 1.0 + 3.0


@pytest.mark.parametrize("allocation", ["bytearray(10 * 2**30)",
                                        "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))"])
def test_allocating_10_gb_fails_within_the_limit(allocation):
    result = run_in_sandbox(allocation, memory_mb=512, timeout_s=30)
    assert not result.passed
    assert result.status in ("failed", "killed"), result
    assert result.status == "killed" or "MemoryError" in result.detail
    assert result.seconds < 30


def test_forked_children_are_bounded_and_none_survives(marker):
    program = UNGUARD + f"""
import os, sys, time
started = 0
for _ in range(300):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:  # a child: sleep a minute, under a name the test can find
        try:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"])
        finally:
            os._exit(1)
    started += 1
time.sleep(0.5)  # let the children exec
raise SystemExit(f"started {{started}}")
"""
    result = run_in_sandbox(program, timeout_s=20)
    assert result.status == "failed", result
    started = int(result.detail.split()[-1])
    assert wait_until_gone(marker) == []
    if sandbox_guarantees()["nproc_limit"]:
        assert started < 64, result.detail


def test_a_child_that_leaves_the_process_group_is_killed_too(marker):
    require("pid_namespace")
    program = UNGUARD + f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()  # a daemon: out of the program's process group and session
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"])
time.sleep(0.5)
raise SystemExit("left a daemon behind")
"""
    result = run_in_sandbox(program, timeout_s=20)
    assert result.status == "failed"
    assert wait_until_gone(marker) == []


def test_deleting_files_outside_the_sandbox_fails(tmp_path):
    require("separate_uid", "read_only_filesystem")
    home = tmp_path / "home"  # stands in for a user's home: never the real one
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("key")
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("still here")
    program = UNGUARD + f"""
import os, pathlib, posix, shutil, subprocess
sentinel, home = {str(sentinel)!r}, {str(home)!r}
def shell(command):
    assert os.system(command) == 0
attempts = {{
    "os.remove": lambda: os.remove(sentinel),
    "os.unlink": lambda: os.unlink(sentinel),
    "posix.unlink": lambda: posix.unlink(sentinel),
    "pathlib": lambda: pathlib.Path(sentinel).unlink(),
    "rename": lambda: os.rename(sentinel, sentinel + ".moved"),
    "truncate": lambda: open(sentinel, "w").close(),
    "chmod": lambda: os.chmod(sentinel, 0),
    "rmtree": lambda: shutil.rmtree(home),
    "rm -rf": lambda: subprocess.run(["rm", "-rf", home, sentinel], check=True),
    "os.system": lambda: shell(f"rm -rf {{home}} {{sentinel}}"),
}}
succeeded = []
for name, attempt in attempts.items():
    try:
        attempt()
        succeeded.append(name)
    except Exception:
        pass
raise SystemExit(f"succeeded: {{succeeded}}")
"""
    result = run_in_sandbox(program, timeout_s=20)
    assert result.status == "failed"
    assert result.detail == "succeeded: []"
    assert sentinel.read_text() == "still here"
    assert (home / ".ssh" / "id_ed25519").read_text() == "key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "sentinel.txt"]


def test_files_written_by_a_program_go_with_it():
    require("read_only_filesystem")
    name = f"/tmp/scratchlm-sandbox-test-{uuid.uuid4().hex}"
    program = UNGUARD + f"""
written = []
for path in ({name!r}, "/dev/shm/" + {os.path.basename(name)!r}, "scratch.txt"):
    try:
        with open(path, "w") as f:
            f.write("x")
        written.append(path)
    except OSError:
        pass
raise SystemExit(f"wrote {{written}}")
"""
    try:
        result = run_in_sandbox(program)
        assert result.detail == "wrote ['scratch.txt']"  # its own (temporary) directory only
    finally:
        for path in (name, "/dev/shm/" + os.path.basename(name)):
            if os.path.exists(path):
                os.remove(path)


def test_a_socket_reaches_nothing():
    require("network_namespace")
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
        program = UNGUARD + f"""
import socket
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"leak", ("127.0.0.1", {udp_port}))
except OSError:
    pass
with socket.create_connection(("127.0.0.1", {tcp_port}), timeout=5) as conn:
    conn.sendall(b"leak")
"""
        result = run_in_sandbox(program, timeout_s=20)
        assert result.status == "failed", result
        assert "Network is unreachable" in result.detail
        tcp.setblocking(False)
        udp.setblocking(False)
        with pytest.raises(BlockingIOError):  # no connection waits in the backlog
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(16)


def test_the_environment_holds_no_secrets(monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("SCRATCHLM_TEST_TOKEN", secret)
    program = f"""
import os
assert {secret!r} not in repr(dict(os.environ)), "the secret leaked"
assert set(os.environ) <= {{"PATH", "HOME", "TMPDIR", "LANG"}}, sorted(os.environ)
"""
    result = run_in_sandbox(program)
    assert result.passed, result


def read_environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def test_other_processes_environments_are_out_of_reach():
    require("separate_uid", "pid_namespace")
    secret = f"secret-{uuid.uuid4().hex}"
    # A process of the caller's with a secret in its environment (this test process's own
    # environment as /proc shows it is the one it started with, so start another).
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, "SCRATCHLM_TEST_TOKEN": secret})
    program = UNGUARD + f"""
import glob
found = []
for path in glob.glob("/proc/*/environ") + glob.glob("/proc/*/task/*/environ"):
    try:
        with open(path, "rb") as f:
            if {secret!r}.encode() in f.read():
                found.append(path)
    except OSError:
        pass
raise SystemExit(f"found {{found}}")
"""
    try:
        deadline = time.monotonic() + 10
        while secret.encode() not in read_environ(holder.pid):  # until it has exec'd
            assert time.monotonic() < deadline, "the helper process did not start"
            time.sleep(0.01)
        result = run_in_sandbox(program)
    finally:
        holder.kill()
        holder.wait()
    assert result.detail == "found []"
