"""Trusted harness executed *inside* the code sandbox (stdlib only: it runs on the sandbox's own
interpreter, e.g. Debian's /usr/bin/python3, never importing anything of ours).

    python3 -I -S _sandbox_harness.py VERDICT_FD SECRET_FD   # jobs arrive framed on stdin

Protocol. The parent sends one marshal frame per job on stdin (program, mode, limits) and one on
SECRET_FD (tests and a fresh nonce); the harness answers on VERDICT_FD with records
`NONCE KIND LEN\n` + marshal payload, ending with a `done` record, then waits for the next job.

Roles. This process (H) never runs untrusted code. In bubblewrap mode it is pid 1 of a fresh pid
namespace (`--as-pid-1`), so signals from the program cannot kill it and `kill(-1)` from H removes
every other process of the sandbox. It makes itself non-dumpable first, so that the program (same
uid, no capabilities) can neither ptrace it nor open `/proc/1/{fd,mem,environ}`.

The untrusted program runs in a forked child (C) that closes every descriptor except its stdio
and, for function tests, its request/response pipes, then applies rlimits and execs the source.

- stdio tests: C_i runs the program as `__main__` with case i's input on stdin; H reads at most
  `max_output` bytes of its stdout and forwards them, with the exit status, to the parent, which
  compares them with the expected output (the expected outputs never enter the sandbox).
- function tests (HumanEval/MBPP): the test code (read by H from the secret channel only after C
  was forked, so the program cannot read it from memory) runs in H with `candidate` bound to a
  proxy; each call is sent to C, which calls the program's function and returns the value
  marshalled. marshal only encodes exact builtin types, and H re-checks that, so a return value
  whose `__eq__` lies cannot cross; the comparisons run in H's untouched interpreter, so patched
  builtins in C change nothing. The parent accepts H's report only on the verdict descriptor,
  which C does not hold, prefixed with a nonce C never sees.

Not covered here (the parent handles it): wall-clock deadline, cgroup limits, output bounds of the
program's own stdout/stderr in function mode. In `unsafe_local` mode H is not pid 1 and nothing
of the above isolation holds except rlimits and process-group kill.
"""

import builtins
import marshal
import os
import resource
import select
import signal
import sys
import time

_PLAIN_ATOMS = (type(None), bool, int, float, complex, str, bytes)
_PLAIN_CONTAINERS = (tuple, list, set, frozenset, dict)
_GRACE_S = 0.2


def _make_undumpable():
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
        return True
    except Exception:
        return False


def _read_all(fd):
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        b = os.read(fd, n - len(buf))
        if not b:
            return None
        buf += b
    return bytes(buf)


def _write_frame(fd, data):
    msg = len(data).to_bytes(4, "big") + data
    view = memoryview(msg)
    while view:
        view = view[os.write(fd, view):]


def _read_frame(fd, limit):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    if n > limit:
        raise ValueError("reply of %d bytes exceeds the %d-byte limit" % (n, limit))
    return _read_exact(fd, n)


def _check_plain(value, max_items=1_000_000):
    """Raise TypeError unless `value` is built only from exact builtin types (no subclasses)."""
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > max_items:
            raise TypeError("value too large")
        t = type(v)
        if t in _PLAIN_ATOMS:
            continue
        if t is dict:
            stack.extend(v.keys())
            stack.extend(v.values())
        elif t in _PLAIN_CONTAINERS:
            stack.extend(v)
        else:
            raise TypeError("return value of type %s is not plain data" % t.__name__)


class _ProgramGone(BaseException):
    """BaseException so that a test's own `except Exception` cannot swallow it."""


# ----------------------------------------------------------------------------------------------
# Child side (becomes untrusted as soon as the program's source is executed).

def _enter_child(job, keep):
    if not job["pid1"]:
        os.setpgid(0, 0)  # unsafe_local: lets H kill the program's process group
    # Close every descriptor but stdio and `keep`: the verdict and secret channels must not exist here.
    keep = sorted(set(keep) | {0, 1, 2})
    lo = 0
    for fd in keep + [65536]:
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    lim = job["limits"]
    for res, val in ((resource.RLIMIT_CPU, lim["cpu"]), (resource.RLIMIT_AS, lim["as"]),
                     (resource.RLIMIT_FSIZE, lim["fsize"]), (resource.RLIMIT_NOFILE, lim["nofile"]),
                     (resource.RLIMIT_NPROC, lim["nproc"]), (resource.RLIMIT_CORE, 0)):
        # CPU: a soft limit below the hard one, so the kernel sends SIGXCPU (graded as the CPU-time
        # limit) rather than an anonymous SIGKILL that would read as an early exit.
        hard = val + 1 if res == resource.RLIMIT_CPU else val
        try:
            resource.setrlimit(res, (val, hard))
        except (ValueError, OSError):
            if res != resource.RLIMIT_NPROC:
                raise
    os.chdir(job["workdir"])
    sys.argv = ["program.py"]
    # Python ignores SIGXFSZ; restore the default so that crossing the file-size limit ends the
    # program visibly (a limit violation) instead of as an OSError it may swallow.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def _exec_program(src, name):
    ns = {"__name__": name, "__file__": "program.py", "__builtins__": __builtins__}
    exec(compile(src, "program.py", "exec"), ns)
    return ns


def _child_exit(code):
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    os._exit(code)


def _child_stdio(job, in_fd, out_fd, err_fd):
    os.dup2(in_fd, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    _enter_child(job, [])
    code = 0
    try:
        _exec_program(job["program"], "__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    _child_exit(code)


def _child_function(job, req_r, resp_w, out_fd, err_fd):
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    _enter_child(job, [req_r, resp_w])
    limit = job["max_output"]
    try:
        ns = _exec_program(job["program"], "program")
        fn = ns.get(job["entry_point"])
        if not callable(fn):
            raise NameError("the program defines no function %r" % job["entry_point"])
    except BaseException as e:
        _write_frame(resp_w, marshal.dumps(("load_error", "%s: %s" % (type(e).__name__, str(e)[:300]))))
        _child_exit(1)
    _write_frame(resp_w, marshal.dumps(("ready",)))
    while True:
        frame = _read_frame(req_r, 1 << 30)
        if frame is None:
            _child_exit(0)
        args, kwargs = marshal.loads(frame)
        try:
            res = fn(*args, **kwargs)
            try:
                data = marshal.dumps(("ok", res))
            except Exception:
                data = marshal.dumps(("bad", type(res).__name__))
        except BaseException as e:
            data = marshal.dumps(("exc", type(e).__name__, str(e)[:300]))
        if len(data) > limit:
            data = marshal.dumps(("bad", "return value larger than %d bytes" % limit))
        _write_frame(resp_w, data)


# ----------------------------------------------------------------------------------------------
# Harness side (trusted).

def _status_str(status):
    if os.WIFSIGNALED(status):
        return "signal:%d" % os.WTERMSIG(status)
    return "exit:%d" % os.WEXITSTATUS(status)


def _reap_child(pid, grace):
    end = time.monotonic() + grace
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return status
        if time.monotonic() > end:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return os.waitpid(pid, 0)[1]
        time.sleep(0.002)


def _sweep(pid1, child_pid):
    """Kill whatever the program left running; return how many processes were left behind."""
    if not pid1:
        try:
            os.killpg(child_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return 0
    while True:  # orphans are reparented to us (pid 1): reap the ones already dead
        try:
            got, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if not got:
            break
    me = os.getpid()
    left = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
    if left:
        try:
            os.kill(-1, signal.SIGKILL)  # as pid 1: every process of the sandbox except us
        except ProcessLookupError:
            pass
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    return len(left)


class _Proxy:
    """Stands in for the program's function inside the checker; every call crosses to C."""

    def __init__(self, req_w, resp_r, limit):
        self.req_w, self.resp_r, self.limit = req_w, resp_r, limit
        self.failure = None  # set on the first sign of foul play; fails the test whatever check() did

    def __call__(self, *args, **kwargs):
        try:
            _write_frame(self.req_w, marshal.dumps((args, kwargs)))
        except BrokenPipeError:
            self.failure = "the program exited before the tests finished"
            raise _ProgramGone(self.failure) from None
        except ValueError as e:
            raise TypeError("the test passes an argument the harness cannot send: %s" % e) from None
        try:
            frame = _read_frame(self.resp_r, self.limit + 64)
        except ValueError as e:
            self.failure = str(e)
            raise _ProgramGone(self.failure) from None
        if frame is None:
            self.failure = "the program exited before the tests finished"
            raise _ProgramGone(self.failure)
        try:
            reply = marshal.loads(frame)
            _check_plain(reply)
        except (ValueError, EOFError, TypeError) as e:
            self.failure = "undecodable reply from the program: %s" % e
            raise _ProgramGone(self.failure) from None
        if type(reply) is not tuple or not reply or reply[0] not in ("ok", "exc", "bad"):
            self.failure = "malformed reply from the program"
            raise _ProgramGone(self.failure)
        if reply[0] == "ok" and len(reply) == 2:
            return reply[1]
        if reply[0] == "bad":
            self.failure = "the function returned a non-plain value (%s)" % (reply[1:],)
            raise _ProgramGone(self.failure)
        name = reply[1] if len(reply) > 1 and type(reply[1]) is str else "Exception"
        exc = getattr(builtins, name, None)
        if not (isinstance(exc, type) and issubclass(exc, Exception)):
            exc = RuntimeError
        raise exc("%s raised in the program: %s" % (name, reply[2] if len(reply) > 2 else ""))


def _failure_detail(exc, test_src):
    import traceback
    if isinstance(exc, AssertionError):
        tb = traceback.extract_tb(exc.__traceback__)
        lines = test_src.splitlines()
        for fr in reversed(tb):
            if fr.filename == "test.py" and 0 < (fr.lineno or 0) <= len(lines):
                return "assertion failed: " + lines[fr.lineno - 1].strip()[:300]
        return "assertion failed"
    return "%s: %s" % (type(exc).__name__, str(exc)[:300])


def _memfd_excerpt(fd, limit):
    """(first `limit` bytes, total size) of a program's captured stream."""
    size = os.fstat(fd).st_size
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, limit) if size else b""
    os.close(fd)
    return data, size


def _run_function(job, secret_fd, pid1):
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    out_fd, err_fd = os.memfd_create("stdout"), os.memfd_create("stderr")
    pid = os.fork()
    if pid == 0:
        os.close(req_w)
        os.close(resp_r)
        _child_function(job, req_r, resp_w, out_fd, err_fd)
    os.close(req_r)
    os.close(resp_w)
    # Read the tests only now: the program's process never holds them.
    secret = marshal.loads(_read_frame(secret_fd, 1 << 30))
    result = {"passed": False, "detail": ""}
    try:
        first = _read_frame(resp_r, job["max_output"] + 64)
        if first is None:
            raise _ProgramGone("the program exited while loading")
        first = marshal.loads(first)
        _check_plain(first)
        if first[0] == "load_error":
            result["detail"] = "program failed to load: %s" % (first[1],)
        elif first != ("ready",):
            result["detail"] = "malformed hello from the program"
        else:
            proxy = _Proxy(req_w, resp_r, job["max_output"])
            ns = {"__name__": "__check__"}
            exec(compile(secret["prelude"], "prelude.py", "exec"), ns)
            ns[job["entry_point"]] = proxy
            exec(compile(secret["test"], "test.py", "exec"), ns)
            ns[job["entry_point"]] = proxy
            if callable(ns.get("check")):
                ns["check"](proxy)
            if proxy.failure:
                result["detail"] = proxy.failure
            else:
                result["passed"] = True
    except _ProgramGone as e:
        result["detail"] = str(e)
    except Exception as e:
        result["detail"] = _failure_detail(e, secret["test"])
    os.close(req_w)
    os.close(resp_r)
    status = _reap_child(pid, _GRACE_S)
    result["status"] = _status_str(status)
    if "program exited" in result["detail"]:
        result["detail"] += " (%s)" % result["status"]
    result["leftover_processes"] = _sweep(pid1, pid)
    result["stdout"], result["stdout_size"] = _memfd_excerpt(out_fd, min(job["max_output"], 4096))
    result["stderr"], result["stderr_size"] = _memfd_excerpt(err_fd, 4096)
    return secret["nonce"], [("function", result)]


def _run_stdio(job, secret_fd, pid1):
    records = []
    limit = job["max_output"]
    for i, data in enumerate(job["inputs"]):
        in_fd, err_fd = os.memfd_create("stdin"), os.memfd_create("stderr")
        os.write(in_fd, data)
        os.lseek(in_fd, 0, os.SEEK_SET)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child_stdio(job, in_fd, w, err_fd)
        os.close(w)
        os.close(in_fd)
        out, over, exited, status = bytearray(), False, False, 0
        while True:
            ready, _, _ = select.select([r], [], [], 0 if exited else 0.05)
            if ready:
                b = os.read(r, 1 << 16)
                if not b:
                    break
                out += b
                if len(out) > limit:
                    over = True
                    break
            elif exited:
                break  # C is gone and its pipe is drained; a descendant may still hold it
            else:
                got, status = os.waitpid(pid, os.WNOHANG)
                exited = bool(got)
        os.close(r)
        if over:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not exited:
            status = _reap_child(pid, _GRACE_S)
        left = _sweep(pid1, pid)
        err, err_size = _memfd_excerpt(err_fd, 4096)
        records.append(("case", {"index": i, "status": "output_limit" if over else _status_str(status),
                                 "leftover_processes": left, "stdout": bytes(out[:limit]),
                                 "stderr": err, "stderr_size": err_size}))
    secret = marshal.loads(_read_frame(secret_fd, 1 << 30))
    return secret["nonce"], records


def _remove_sysv_ipc():
    """Drop SysV IPC objects a program created in the sandbox's IPC namespace (pid-1 mode only),
    so nothing it stored there reaches the next program served by this sandbox."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except Exception:
        return
    for kind, rm in (("shm", lambda i: libc.shmctl(i, 0, None)), ("sem", lambda i: libc.semctl(i, 0, 0)),
                     ("msg", lambda i: libc.msgctl(i, 0, None))):
        try:
            with open("/proc/sysvipc/" + kind) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 1 and cols[1].isdigit():
                rm(int(cols[1]))


def _wipe(job, pid1):
    """Empty the writable places a program could leave state in, before the next one runs."""
    import shutil
    roots = ["/tmp", "/dev/shm"] if pid1 else [job["workdir"]]
    for root in roots:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
    if pid1:
        _remove_sysv_ipc()


def main():
    """Serve jobs (one marshal frame each on stdin) until stdin closes; one verdict batch per job."""
    verdict_fd, secret_fd = int(sys.argv[1]), int(sys.argv[2])
    pid1 = os.getpid() == 1
    undumpable = _make_undumpable()
    while True:
        frame = _read_frame(0, 1 << 30)
        if frame is None:
            return
        job = marshal.loads(frame)
        job["pid1"] = pid1
        if pid1:
            os.makedirs(job["workdir"], exist_ok=True)
        try:
            if job["mode"] == "stdio":
                nonce, records = _run_stdio(job, secret_fd, pid1)
            else:
                nonce, records = _run_function(job, secret_fd, pid1)
        finally:
            _wipe(job, pid1)
        records.append(("done", {"undumpable": undumpable, "pid1": pid1}))
        out = bytearray()
        for kind, payload in records:
            data = marshal.dumps(payload)
            out += ("%s %s %d\n" % (nonce, kind, len(data))).encode() + data
        view = memoryview(out)
        while view:
            view = view[os.write(verdict_fd, view):]


if __name__ == "__main__":
    main()
