"""Run untrusted Python programs in a bubblewrap sandbox and bring back bounded, trustworthy results.

    sb = Sandbox(SandboxConfig())           # raises SandboxUnavailable if bwrap is missing
    res = sb.run_function(program, entry_point="add", test="def check(c): assert c(1, 2) == 3")
    res = sb.run_stdio(program, inputs=[b"1 2\\n"])

What one run gets (bubblewrap mode):
- namespaces: `bwrap --unshare-all` (user, pid, net, ipc, uts, cgroup), `--die-with-parent`,
  `--new-session` (no TIOCSTI into our terminal), `--clearenv`, `--as-pid-1` for the trusted
  harness (`reward/_sandbox_harness.py`), `--disable-userns` (no nested namespaces);
- filesystem: an empty read-only root with `/usr` (+ `/lib*`, `/bin` symlinks) bound read-only,
  a fresh `/proc` of the sandbox's own pid namespace, a minimal read-only `/dev`, and private
  size-capped tmpfs mounts at `/tmp` (holding the work dir) and `/dev/shm`. Nothing of the host's /root, /home, /tmp or /etc exists inside;
- an unprivileged host uid/gid (65534 by default): bwrap is started as that user, so even an
  escape from the namespaces lands as `nobody`;
- rlimits on the program's processes: CPU seconds, address space, file size, open files, process
  count, no core dumps;
- cgroups where writable (v2 with its controllers, else v1 `memory` and `pids`): a memory limit
  and a pids limit for the whole sandbox, plus `cgroup.kill` for the whole tree where v2 exists;
- a wall-clock deadline enforced here, in the parent; on expiry (or when an output bound is
  crossed) bwrap is SIGKILLed, which kills the harness (pid 1 of the namespace) through
  `--die-with-parent`, which makes the kernel kill every process of the namespace;
- bounded reads: at most `max_output_bytes` of the program's stdout and of its stderr are read
  here; more is a violation and ends the run.

Verdicts come back on a dedicated descriptor that only the harness holds, each record prefixed
with a per-run nonce; the parent checks both and compares stdio outputs itself.

Reuse. Starting bwrap and an interpreter costs more than most test programs (~10 programs/s
here against ~170/s reused), so one sandbox process serves up to `jobs_per_sandbox` programs,
one at a time, each in a freshly forked child with the limits above. Between programs the harness
(pid 1) SIGKILLs every other process of the namespace and empties /tmp, /dev/shm and SysV IPC;
the tests are only sent to the harness after the program's child exists, and the harness is
non-dumpable, so a program can neither read the tests nor tamper with the next program's verdict.
A run that timed out, crossed a limit or produced a malformed channel retires its sandbox.
What reuse does share between consecutive programs of one sandbox: the kernel namespaces
themselves (e.g. the loopback interface's state) and the cgroup's cumulative counters (we compare
them before and after each program). Set `jobs_per_sandbox=1` for a fresh sandbox per program.

Not covered: kernel exploits (bubblewrap shares the host kernel; there is no seccomp filter
here), timing side channels, CPU contention between concurrent sandboxes (no cpu controller),
programs that need the network, a GPU or packages outside the sandbox interpreter's stdlib
(`-S` is the default). `unsafe_local` mode runs the same harness as a plain subprocess with
rlimits and a process-group kill only: no filesystem, network or pid isolation.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import marshal
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path

from reward.config import SandboxConfig

HARNESS = Path(__file__).with_name("_sandbox_harness.py")
_INSIDE_HARNESS = "/.mtprl_harness.py"
_WORKDIR = "/tmp/work"


class SandboxUnavailable(RuntimeError):
    """No usable sandbox on this host (and `unsafe_local` was not chosen)."""


@dataclasses.dataclass
class RunResult:
    """What came back from one sandbox run, before grading."""

    records: list[tuple[str, dict]]  # (kind, payload) from the harness, nonce already checked
    exit_status: int | None  # of bwrap (= the harness's exit status), None if killed by us
    timed_out: bool = False
    violations: list[str] = dataclasses.field(default_factory=list)
    channel_error: str = ""  # the verdict channel was malformed or carried a wrong nonce
    stdout: bytes = b""
    stderr: bytes = b""
    elapsed_s: float = 0.0


# ------------------------------------------------------------------------------------------------
# cgroups


def _cgroup_mounts() -> dict[str, str]:
    """Mount points by hierarchy: 'v2' for cgroup2, controller names for v1."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, post_f = pre.split(), post.split()
        if len(post_f) < 3:
            continue
        fstype, mnt = post_f[0], fields[4]
        if fstype == "cgroup2":
            out.setdefault("v2", mnt)
        elif fstype == "cgroup":
            for opt in post_f[2].split(","):
                if opt in ("memory", "pids"):
                    out.setdefault(opt, mnt)
    return out


def _own_cgroup_paths() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrls, path = line.split(":", 2)
            if hid == "0" and ctrls == "":
                out["v2"] = path
            for c in ctrls.split(","):
                if c in ("memory", "pids"):
                    out[c] = path
    except OSError:
        pass
    return out


_INSTANCES = itertools.count()


def _remove_tree(d: Path) -> None:
    """rmdir a cgroup and its child cgroups (cgroupfs dirs are removed with rmdir, bottom-up)."""
    try:
        for child in d.iterdir():
            if child.is_dir():
                _remove_tree(child)
        d.rmdir()
    except OSError:
        pass


def _remove_stale(parent: Path) -> None:
    """Remove cgroups left by sandboxes of processes that no longer exist (killed without cleanup)."""
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith("mtprl-sandbox-")]
    except OSError:
        return
    for p in entries:
        pid = p.name.split("-")[2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _remove_tree(p)


class _Cgroups:
    """Per-run cgroups in whichever hierarchies this process may write. Best effort by design:
    the sandbox's namespaces and rlimits hold without them; these add whole-tree memory and pids
    limits and a race-free kill."""

    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.bases: dict[str, Path] = {}  # hierarchy -> our parent dir
        self.v2_controllers: set[str] = set()
        self._seq = itertools.count()
        mounts, own = _cgroup_mounts(), _own_cgroup_paths()
        tag = f"mtprl-sandbox-{os.getpid()}-{next(_INSTANCES)}"
        for h in ("v2", "memory", "pids"):
            if h not in mounts or h not in own:
                continue
            parent = Path(mounts[h]) / own[h].lstrip("/")
            _remove_stale(parent)
            base = parent / tag
            try:
                base.mkdir(exist_ok=True)
                if h == "v2":
                    avail = set((base.parent / "cgroup.controllers").read_text().split())
                    want = avail & {"memory", "pids"}
                    if want:
                        try:  # fails when our own cgroup holds processes ("no internal processes")
                            (base / "cgroup.subtree_control").write_text(" ".join("+" + c for c in want))
                        except OSError:
                            pass
                    self.v2_controllers = set((base / "cgroup.controllers").read_text().split())
                self.bases[h] = base
            except OSError:
                continue
        # v1 controllers only where v2 does not already provide them
        for c in ("memory", "pids"):
            if c in self.v2_controllers:
                self.bases.pop(c, None)

    @property
    def active(self) -> list[str]:
        return sorted(self.bases)

    def remove(self) -> None:
        """Remove our (by now empty) parent cgroups."""
        for base in self.bases.values():
            _remove_tree(base)

    def create(self) -> dict[str, Path]:
        n = next(self._seq)
        dirs: dict[str, Path] = {}
        for h, base in self.bases.items():
            d = base / f"run-{n}"
            try:
                d.mkdir()
                if h == "v2":
                    if "memory" in self.v2_controllers:
                        (d / "memory.max").write_text(str(self.cfg.memory_bytes))
                        (d / "memory.swap.max").write_text("0") if (d / "memory.swap.max").exists() else None
                    if "pids" in self.v2_controllers:
                        (d / "pids.max").write_text(str(self.cfg.pids_max))
                elif h == "memory":
                    (d / "memory.limit_in_bytes").write_text(str(self.cfg.memory_bytes))
                elif h == "pids":
                    (d / "pids.max").write_text(str(self.cfg.pids_max))
                dirs[h] = d
            except OSError:
                continue
        return dirs

    @staticmethod
    def counters(dirs: dict[str, Path]) -> dict[str, int]:
        """Monotonic limit-hit counters ('memory', 'process'); a job hit a limit if one grew."""
        out: dict[str, int] = {}
        for h, d in dirs.items():
            try:
                if h == "memory":
                    out["memory"] = int((d / "memory.failcnt").read_text())
                elif h == "pids":
                    out["process"] = int((d / "pids.events").read_text().split()[1])
                elif h == "v2":
                    if (d / "memory.events").exists():
                        ev = dict(line.split() for line in (d / "memory.events").read_text().splitlines())
                        out["memory"] = int(ev.get("max", 0)) + int(ev.get("oom_kill", 0))
                    if (d / "pids.events").exists():
                        out["process"] = int((d / "pids.events").read_text().split()[1])
            except (OSError, ValueError, IndexError):
                continue
        return out

    @staticmethod
    def violations(dirs: dict[str, Path], before: dict[str, int]) -> list[str]:
        after = _Cgroups.counters(dirs)
        return [f"{k} limit reached" for k in after if after[k] > before.get(k, 0)]

    @staticmethod
    def destroy(dirs: dict[str, Path]) -> None:
        for h, d in dirs.items():
            if h == "v2" and (d / "cgroup.kill").exists():
                try:
                    (d / "cgroup.kill").write_text("1")
                except OSError:
                    pass
            for _ in range(200):  # a killed task leaves the cgroup a moment after SIGKILL
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for p in pids:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.005)
            try:
                d.rmdir()
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------


def _write_all_frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (those that did not start a session of their own)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid:  # fields after the command: state ppid pgrp session ...
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


class _Slot:
    """One long-lived sandbox process (bwrap + harness as pid 1) serving jobs one at a time."""

    def __init__(self, sandbox: "Sandbox") -> None:
        cfg = sandbox.config
        self.jobs = 0
        self.tmp = tempfile.mkdtemp(prefix="mtprl-sbx-") if cfg.mode == "unsafe_local" else None
        if self.tmp and sandbox._root:
            os.chown(self.tmp, cfg.uid, cfg.gid)
        self.workdir = self.tmp or _WORKDIR
        self.dirs = sandbox.cgroups.create() if sandbox.cgroups else {}
        verdict_r, verdict_w = os.pipe()
        secret_r, secret_w = os.pipe()
        cmd = sandbox._harness_command(verdict_w, secret_r)
        drop = {"user": cfg.uid, "group": cfg.gid, "extra_groups": []} if sandbox._root else {}
        if self.dirs:
            # Join the cgroups (as root: v2 wants write access at the common ancestor) before bwrap
            # exists, so no process of the sandbox ever starts outside them; then drop to the sandbox uid.
            procs = [str(d / "cgroup.procs") for d in self.dirs.values()]
            script = "".join(f'echo $$ > "${i + 1}" && ' for i in range(len(procs))) + f"shift {len(procs)} && exec \"$@\""
            cmd = ["/bin/sh", "-c", script, "sh", *procs,
                   sandbox._setpriv, f"--reuid={cfg.uid}", f"--regid={cfg.gid}", "--clear-groups", "--", *cmd]
            drop = {}
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         pass_fds=(verdict_w, secret_r), env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                         cwd=self.tmp or "/", start_new_session=True, **drop)
        except BaseException:
            for fd in (verdict_r, verdict_w, secret_r, secret_w):
                os.close(fd)
            _Cgroups.destroy(self.dirs)
            raise
        os.close(verdict_w)
        os.close(secret_r)
        self.verdict_r, self.secret_w = verdict_r, secret_w
        self.stdin_fd, self.stderr_fd = self.proc.stdin.fileno(), self.proc.stderr.fileno()
        for fd in (verdict_r, secret_w, self.stdin_fd, self.stderr_fd):
            os.set_blocking(fd, False)
        self.alive = True

    def counters(self) -> dict[str, int]:
        return _Cgroups.counters(self.dirs)

    def kill(self) -> None:
        """Kill the sandbox and everything in it: bwrap's death takes the harness (pid 1 of the
        namespace) by PDEATHSIG, whose death makes the kernel kill the whole namespace; the
        cgroup sweep and the process-group kill cover unsafe mode and stragglers."""
        if not self.alive:
            return
        self.alive = False
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        if self.tmp:  # unsafe mode: no pid namespace; the program's process groups share our session
            _kill_session(self.proc.pid)
        self.proc.wait()
        _Cgroups.destroy(self.dirs)
        for f in (self.proc.stdin, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        for fd in (self.verdict_r, self.secret_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


class Sandbox:
    """Runs the trusted harness around untrusted programs. Thread-safe: at most `max_parallel`
    programs run at once, each in its own sandbox process; callers beyond that wait."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = cfg = config or SandboxConfig()
        self.bwrap = shutil.which("bwrap")
        if cfg.mode == "bwrap" and not self.bwrap:
            raise SandboxUnavailable(
                "bubblewrap (`bwrap`) is not installed, so untrusted code cannot be sandboxed. Install it "
                "(Debian/Ubuntu: `apt-get install bubblewrap`, or `make system-deps`), or choose "
                "SandboxConfig(mode='unsafe_local') to run programs WITHOUT isolation (trusted code only).")
        if not os.path.exists(cfg.python):
            raise SandboxUnavailable(f"sandbox interpreter {cfg.python} does not exist")
        if cfg.mode == "bwrap" and not any(cfg.python.startswith(b.rstrip("/") + "/") for b in cfg.ro_binds):
            raise SandboxUnavailable(f"sandbox interpreter {cfg.python} is not under a bound directory {cfg.ro_binds}")
        self._root = os.geteuid() == 0
        # A world-readable copy of the harness: the sandbox user must read it, and the package may
        # live where `nobody` cannot (e.g. under /root).
        self._harness_dir = tempfile.mkdtemp(prefix="mtprl-harness-")
        os.chmod(self._harness_dir, 0o755)
        self._harness = Path(self._harness_dir) / "harness.py"
        shutil.copyfile(HARNESS, self._harness)
        os.chmod(self._harness, 0o644)
        self._optional: set[str] = set()
        if cfg.mode == "bwrap":
            try:
                self._probe_bwrap()
            except BaseException:
                shutil.rmtree(self._harness_dir, ignore_errors=True)
                raise
        self._setpriv = shutil.which("setpriv")
        self.cgroups = _Cgroups(cfg) if cfg.use_cgroups and self._root and self._setpriv else None
        self._idle: list[_Slot] = []
        self._closed = False
        self._idle_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(cfg.max_parallel)
        self.restarts = 0
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
        # no sandbox process or cgroup outlives this object, closed or not
        self._finalizer = weakref.finalize(self, Sandbox._kill_all, self._idle, self.cgroups, self._harness_dir)

    @staticmethod
    def _kill_all(slots: list[_Slot], cgroups: "_Cgroups | None", harness_dir: str) -> None:
        for s in list(slots):
            s.kill()
        slots.clear()
        if cgroups is not None:
            cgroups.remove()
        shutil.rmtree(harness_dir, ignore_errors=True)

    def close(self) -> None:
        """Stop the idle sandboxes (running ones stop when their program ends) and remove our cgroups."""
        with self._idle_lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API -------------------------------------------------------------------------------

    def run_stdio(self, program: str, inputs: list[bytes], timeout_s: float | None = None) -> RunResult:
        """Run `program` once per input on stdin; records carry each case's stdout and status."""
        job = {"mode": "stdio", "program": program, "inputs": list(inputs)}
        return self._run(job, {}, timeout_s)

    def run_function(self, program: str, entry_point: str, test: str, prelude: str = "",
                     timeout_s: float | None = None) -> RunResult:
        """Run `check(candidate)` from `test` in the harness against `program`'s `entry_point`."""
        job = {"mode": "function", "program": program, "entry_point": entry_point}
        return self._run(job, {"test": test, "prelude": prelude}, timeout_s)

    # -- internals --------------------------------------------------------------------------------

    def _probe_bwrap(self) -> None:
        """Refuse early, with bwrap's own words, when it cannot build our sandbox on this host
        (too old, user namespaces disabled, ...), instead of failing every program later."""
        try:
            out = subprocess.run([self.bwrap, "--help"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SandboxUnavailable(f"cannot run {self.bwrap}: {e}") from e
        text = out.stdout + out.stderr
        need = ["--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--as-pid-1", "--perms"]
        missing = [f for f in need if f not in text]
        if missing:
            raise SandboxUnavailable(f"{self.bwrap} lacks {missing}; bubblewrap >= 0.5 is required")
        # newer hardening, used when this bwrap has it (0.8 has both)
        self._optional = {f for f in ("--disable-userns", "--size") if f in text}
        drop = {"user": self.config.uid, "group": self.config.gid, "extra_groups": []} if self._root else {}
        probe = self._command([self.config.python, *self.config.python_flags, "-c", "import os; print(os.getuid())"])
        try:
            r = subprocess.run(probe, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
                               cwd="/", **drop)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SandboxUnavailable(f"bubblewrap probe failed: {e}") from e
        if r.returncode != 0 or r.stdout.strip() != str(self.config.uid):
            raise SandboxUnavailable(f"bubblewrap cannot create the sandbox on this host (exit {r.returncode}): "
                                     f"{r.stderr.strip()[-500:]}")

    def _command(self, tail: list[str]) -> list[str]:
        """The full command line that runs `tail` (interpreter and arguments) in a fresh sandbox."""
        cfg = self.config
        if cfg.mode == "unsafe_local":
            return tail
        size = lambda: ["--size", str(cfg.tmpfs_bytes)] if "--size" in self._optional else []  # noqa: E731
        cmd = [self.bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--clearenv",
               "--as-pid-1", *(["--disable-userns"] if "--disable-userns" in self._optional else []),
               "--uid", str(cfg.uid), "--gid", str(cfg.gid)]
        for d in cfg.ro_binds:
            if os.path.exists(d):
                cmd += ["--ro-bind", d, d]
        for name in ("lib", "lib64", "bin", "sbin"):
            if os.path.islink(f"/{name}") or not os.path.exists(f"/{name}"):
                if os.path.exists(f"/usr/{name}"):
                    cmd += ["--symlink", f"usr/{name}", f"/{name}"]
            else:
                cmd += ["--ro-bind", f"/{name}", f"/{name}"]
        cmd += ["--proc", "/proc", "--dev", "/dev",
                # bwrap's /dev is an unbounded tmpfs writable by the sandbox user: give /dev/shm its own
                # capped tmpfs and make the rest of /dev read-only (device nodes stay usable)
                *size(), "--perms", "1777", "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
                *size(), "--perms", "1777", "--tmpfs", "/tmp",
                "--ro-bind", str(self._harness), _INSIDE_HARNESS,
                "--remount-ro", "/", "--chdir", "/tmp",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0",
                *tail]
        return cmd

    def _harness_command(self, verdict_fd: int, secret_fd: int) -> list[str]:
        cfg = self.config
        script = str(self._harness) if cfg.mode == "unsafe_local" else _INSIDE_HARNESS
        return self._command([cfg.python, *cfg.python_flags, script, str(verdict_fd), str(secret_fd)])

    def _acquire(self) -> _Slot:
        if self._closed:
            raise RuntimeError("Sandbox is closed")
        self._slots.acquire()  # bounded concurrency: waits while max_parallel programs are running
        try:
            while True:
                with self._idle_lock:
                    slot = self._idle.pop() if self._idle else None
                if slot is None:
                    break
                if slot.proc.poll() is None:
                    return slot
                slot.kill()  # died while idle (killed from outside): replace it
            # Sandboxes are started from one long-lived thread: `--die-with-parent` ties bwrap to
            # the *thread* that forked it, and a caller's short-lived thread would take it along.
            return self._spawner.submit(_Slot, self).result()
        except BaseException:
            self._slots.release()
            raise

    def _release(self, slot: _Slot, reusable: bool) -> None:
        try:
            with self._idle_lock:
                keep = reusable and slot.alive and slot.jobs < self.config.jobs_per_sandbox and not self._closed
                if keep:
                    self._idle.append(slot)
            if not keep:
                if slot.alive and not reusable:
                    self.restarts += 1
                slot.kill()
        finally:
            self._slots.release()

    def _run(self, job: dict, secret: dict, timeout_s: float | None) -> RunResult:
        cfg = self.config
        timeout_s = cfg.wall_timeout_s if timeout_s is None else timeout_s
        nonce = secrets.token_hex(16)
        t0 = time.monotonic()
        slot = self._acquire()
        reusable = False
        try:
            job.update(workdir=slot.workdir, max_output=cfg.max_output_bytes,
                       limits={"cpu": cfg.cpu_seconds, "as": cfg.address_space_bytes, "fsize": cfg.file_size_bytes,
                               "nofile": cfg.open_files, "nproc": cfg.nproc})
            before = slot.counters()
            res = self._exchange(slot, _write_all_frame(marshal.dumps(job)),
                                 _write_all_frame(marshal.dumps({**secret, "nonce": nonce})),
                                 time.monotonic() + timeout_s, nonce)
            slot.jobs += 1
            after = slot.counters()
            res.violations += [f"{k} limit reached" for k in after if after[k] > before.get(k, 0)]
            # a sandbox that hit a limit, timed out or spoke out of turn is not trusted with another job
            reusable = not (res.timed_out or res.violations or res.channel_error or res.exit_status is not None)
        finally:
            self._release(slot, reusable)
        res.elapsed_s = time.monotonic() - t0
        return res

    def _exchange(self, slot: _Slot, job: bytes, secret: bytes, deadline: float, nonce: str) -> RunResult:
        cfg = self.config
        limit = 64 * cfg.max_output_bytes + (1 << 20)
        pending = {slot.stdin_fd: memoryview(job), slot.secret_w: memoryview(secret)}
        buf, err = bytearray(), bytearray()
        res = RunResult(records=[], exit_status=None)
        sel = selectors.DefaultSelector()
        for fd in pending:
            sel.register(fd, selectors.EVENT_WRITE, "in")
        sel.register(slot.verdict_r, selectors.EVENT_READ, "verdict")
        sel.register(slot.stderr_fd, selectors.EVENT_READ, "stderr")
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    res.timed_out = True
                    break
                events = sel.select(timeout=left)
                for key, _ in events:
                    fd = key.fd
                    if key.data == "in":
                        try:
                            n = os.write(fd, pending[fd])
                        except BlockingIOError:
                            n = 0
                        except BrokenPipeError:
                            n = len(pending[fd])
                        pending[fd] = pending[fd][n:]
                        if not pending[fd]:
                            sel.unregister(fd)
                        continue
                    try:
                        b = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if key.data == "stderr":  # the harness's own diagnostics: keep the tail
                        if not b:
                            sel.unregister(fd)
                        err = (err + b)[-4096:]
                        continue
                    if not b:  # the harness is gone without finishing the job
                        slot.proc.wait()
                        res.exit_status = slot.proc.returncode
                        res.channel_error = "sandbox exited before reporting (status %s)" % res.exit_status
                        res.stderr = bytes(err)
                        return res
                    buf += b
                    if len(buf) > limit:
                        res.violations.append(f"verdict channel exceeded {limit} bytes")
                        return res
                    records, done, problem = _parse_records(bytes(buf), nonce)
                    if problem:
                        res.channel_error = problem
                        return res
                    if done:
                        info = records.pop()[1]
                        if cfg.mode == "bwrap" and not (info.get("pid1") and info.get("undumpable")):
                            # without both, the program could ptrace or signal the harness
                            res.channel_error = f"sandbox exited before reporting: harness unprotected {info}"
                        res.records = records
                        res.stderr = bytes(err)
                        return res
        finally:
            sel.close()
        res.stderr = bytes(err)
        return res


def _parse_records(raw: bytes, nonce: str) -> tuple[list[tuple[str, dict]], bool, str]:
    """Split the verdict channel into records: (records, complete, problem). Any malformation or
    foreign nonce voids the lot (`problem` says which); incomplete input is simply not done yet."""
    out: list[tuple[str, dict]] = []
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos, pos + 200)
        if nl < 0:
            return out, False, ("malformed verdict record header" if len(raw) - pos >= 200 else "")
        parts = raw[pos:nl].split(b" ")
        if len(parts) != 3 or not parts[2].isdigit():
            return [], False, "malformed verdict record header"
        if parts[0].decode("ascii", "replace") != nonce:
            return [], False, "verdict record with a wrong nonce"
        n = int(parts[2])
        payload = raw[nl + 1: nl + 1 + n]
        if len(payload) != n:
            return out, False, ""
        try:
            value = marshal.loads(payload)
        except (ValueError, EOFError, TypeError):
            return [], False, "undecodable verdict record"
        if type(value) is not dict:
            return [], False, "verdict record is not a dict"
        kind = parts[1].decode("ascii", "replace")
        pos = nl + 1 + n
        if kind == "done":
            if pos != len(raw):
                return [], False, "bytes after the final verdict record"
            out.append((kind, value))
            return out, True, ""
        out.append((kind, value))
    return out, False, ""
