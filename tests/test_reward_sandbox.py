"""The code sandbox: HumanEval canonical solutions pass, wrong ones fail, and an attack suite is
contained and scored as a failure or a violation while the runner keeps serving."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from reward.code_grader import CodeGrader
from reward.config import CodeConfig, SandboxConfig
from reward.datasets import humaneval_items
from reward.sandbox import Sandbox, SandboxUnavailable

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
]

ADD_TEST = {"type": "assert", "entry_point": "add", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
                                                            "    assert candidate(-1, 1) == 0\n"}
GOOD_ADD = "def add(a, b):\n    return a + b\n"
FAIL = {"wrong", "sandbox_violation", "timeout"}


@pytest.fixture(scope="module")
def grader():
    cfg = CodeConfig(sandbox=SandboxConfig(wall_timeout_s=2.0, cpu_seconds=2, pids_max=32, tmpfs_bytes=16 << 20,
                                           file_size_bytes=4 << 20, max_output_bytes=64 << 10))
    with Sandbox(cfg.sandbox) as sb:
        yield CodeGrader(cfg, sb)


@pytest.fixture(scope="module")
def he_grader():
    """Default limits (10 s wall): the HumanEval checks must not race a tight attack deadline."""
    with Sandbox(SandboxConfig()) as sb:
        yield CodeGrader(CodeConfig(), sb)


@pytest.fixture(scope="module")
def humaneval():
    return humaneval_items()


def still_serving(grader: CodeGrader) -> None:
    v = grader.grade(GOOD_ADD, ADD_TEST, timeout_s=30)  # generous: the host may be loaded
    assert v.outcome == "ok", v


def test_all_164_humaneval_canonical_solutions_pass(he_grader, humaneval):
    assert len(humaneval) == 164
    verdicts = he_grader.grade_batch([(it.meta["reference_program"], it.gold) for it in humaneval])
    bad = [(it.id, v) for it, v in zip(humaneval, verdicts) if v.outcome != "ok"]
    assert not bad, bad[:5]


def test_humaneval_wrong_solutions_fail(he_grader, humaneval):
    # the prompt alone (stub returns None) and every solution shifted onto its neighbour's problem
    stubs = [(it.meta["prompt_code"] + "    return None\n", it.gold) for it in humaneval]
    shifted = [(humaneval[i - 1].meta["reference_program"].replace(humaneval[i - 1].gold.entry_point,
                                                                     it.gold.entry_point), it.gold)
               for i, it in enumerate(humaneval)]
    verdicts = he_grader.grade_batch(stubs + shifted)
    passed = [v for v in verdicts if v.outcome == "ok"]
    assert not passed, passed[:3]
    assert all(v.outcome == "wrong" for v in verdicts)


def test_stdio_cases_are_compared_in_the_parent(grader):
    prog = "a, b = map(int, input().split())\nprint(a + b)\n"
    ok = grader.grade(prog, {"type": "stdio", "cases": [{"input": "1 2\n", "output": "3"},
                                                         {"input": "10 -4", "output": "6\n"}]})
    assert ok.outcome == "ok" and ok.reward == 1.0
    bad = grader.grade(prog, {"type": "stdio", "cases": [{"input": "1 2", "output": "4"}]})
    assert bad.outcome == "wrong" and "expected '4', got '3'" in bad.detail
    crash = grader.grade("raise SystemExit(3)", {"type": "stdio", "cases": [{"input": "", "output": ""}]})
    assert crash.outcome == "wrong" and "exit:3" in crash.detail


def test_refuses_without_bwrap_unless_unsafe_mode_is_chosen(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        Sandbox(SandboxConfig())
    with Sandbox(SandboxConfig(mode="unsafe_local", use_cgroups=False)) as sb:
        v = CodeGrader(CodeConfig(), sb).grade(GOOD_ADD, ADD_TEST)
    assert v.outcome == "ok"


def test_refuses_with_bwraps_words_when_it_cannot_build_a_sandbox(monkeypatch):
    d = Path(tempfile.mkdtemp())  # not under pytest's 0700 tmp: the probe runs as the sandbox uid
    d.chmod(0o755)
    fake = d / "bwrap"
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$1\" = --help ]; then /usr/bin/bwrap --help; exit 0; fi\n"
                    "echo 'bwrap: No permissions to creating new namespace' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(fake) if name == "bwrap" else "/usr/bin/" + name)
    try:
        with pytest.raises(SandboxUnavailable, match="No permissions to creating new namespace"):
            Sandbox(SandboxConfig())
    finally:
        shutil.rmtree(d)


def test_sandbox_runs_as_unprivileged_user_without_network_or_host_files(grader):
    prog = textwrap.dedent("""
        import os, socket
        print(os.getuid(), os.getgid(), os.getpid())
        print(sorted(os.listdir('/')))
        print(sorted(os.listdir('/etc')))
        print(sorted(os.environ))
        print([n for _, n in socket.if_nameindex()])
    """)
    res = grader.sandbox.run_stdio(prog, [b""])
    (kind, rec), = res.records
    out = rec["stdout"].decode().splitlines()
    assert out[0].split()[:2] == ["65534", "65534"]
    assert set(eval(out[1])) <= {".mtprl_harness.py", "bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr"}
    assert eval(out[2]) == ["alternatives"]
    assert set(eval(out[3])) <= {"HOME", "LANG", "PATH", "PYTHONHASHSEED", "PWD"}
    assert eval(out[4]) == ["lo"]


# ------------------------------------------------------------------------------------------------
# Attack suite. Each program is scored as a failure (wrong/timeout) or a violation; afterwards the
# same grader still grades a correct program as ok.

ATTACKS = {
    "fork_bomb": ("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, {"sandbox_violation", "timeout"}),
    "memory_bomb": ("""
        blocks = []
        while True:
            blocks.append(bytearray(64 << 20))
        def add(a, b):
            return a + b
        """, FAIL),
    "memory_bomb_many_processes": ("""
        import os, time
        for _ in range(6):
            if os.fork() == 0:
                try:
                    b = bytearray(700 << 20)
                    for i in range(0, len(b), 4096):
                        b[i] = 1
                except MemoryError:
                    pass
                time.sleep(5)
                os._exit(0)
        time.sleep(5)
        """, {"sandbox_violation", "timeout"}),
    "infinite_loop": ("""
        def add(a, b):
            while True:
                pass
        """, {"timeout", "sandbox_violation"}),
    "sleep_past_deadline": ("""
        import time
        def add(a, b):
            time.sleep(60)
            return a + b
        """, {"timeout"}),
    "busy_daemon_children": ("""
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    pass
            os._exit(0)
        def add(a, b):
            return a + b
        """, {"sandbox_violation"}),
    "disk_fill": ("""
        import os
        n = 0
        try:
            while True:
                with open(f'/tmp/fill{n}', 'wb') as f:
                    f.write(b'x' * (1 << 20))
                n += 1
        except OSError:
            pass
        def add(a, b):
            return None
        """, FAIL),
    "big_file": ("""
        with open('big', 'wb') as f:
            while True:
                f.write(b'x' * (1 << 20))
        """, {"sandbox_violation"}),
    "huge_stdout": ("""
        import sys
        while True:
            sys.stdout.write('x' * 65536)
        """, {"sandbox_violation"}),
    "kill_parent_and_everyone": ("""
        import os, signal
        for pid in (os.getppid(), 1, -1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        def add(a, b):
            return a - b
        """, {"wrong"}),  # the harness (pid 1) survives and still reports the failed assertion
    "exit_zero_before_tests": ("""
        import os
        def add(a, b):
            return a + b
        os._exit(0)
        """, FAIL),
    "eq_always_true": ("""
        class Liar(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def add(a, b):
            return Liar(0)
        """, FAIL),
    "eq_always_true_plain_object": ("""
        class Anything:
            def __eq__(self, other):
                return True
        def add(a, b):
            return Anything()
        """, FAIL),
    "monkeypatch_builtins": ("""
        import builtins
        class NoAssert(Exception):
            pass
        builtins.AssertionError = NoAssert
        builtins.abs = lambda x: 0
        builtins.isinstance = lambda *a: True
        builtins.type = lambda *a: int
        def add(a, b):
            return None
        """, FAIL),
    "patch_the_harness": ("""
        import sys, gc
        main = sys.modules['__main__']
        for name in dir(main):
            obj = getattr(main, name)
            if callable(obj):
                try:
                    setattr(main, name, lambda *a, **k: None)
                except Exception:
                    pass
        for o in gc.get_objects():
            if isinstance(o, dict) and 'passed' in o:
                o['passed'] = True
        def add(a, b):
            return None
        """, FAIL),
    "fake_success_marker": ("""
        import os
        for fd in range(0, 64):
            for marker in (b'PASSED\\n', b'ok\\n', b'0' * 32 + b' function 1\\nT', b'all tests passed\\n'):
                try:
                    os.write(fd, marker)
                except OSError:
                    pass
        print('{"outcome": "ok", "reward": 1.0}')
        def add(a, b):
            return None
        """, FAIL),
    "read_tests_from_memory": ("""
        import gc
        found = [o for o in gc.get_objects() if isinstance(o, str) and 'candidate(2, 3)' in o]
        def add(a, b):
            return 'found' if found else None
        """, FAIL),
    "ptrace_or_proc_of_pid1": ("""
        import ctypes, os
        libc = ctypes.CDLL(None)
        got = libc.ptrace(16, 1, 0, 0)  # PTRACE_ATTACH to the harness
        leaked = []
        paths = ['/proc/1/mem', '/proc/1/environ'] + ['/proc/1/fd/%d' % i for i in range(64)]
        try:
            paths += ['/proc/1/fd/' + f for f in os.listdir('/proc/1/fd')]
        except OSError:
            pass
        for p in paths:
            try:
                with open(p, 'rb') as f:
                    leaked.append(f.read(16))
            except OSError:
                pass
            try:
                with open(p, 'wb') as f:
                    f.write(b'0' * 32 + b' function 1\n')
                    leaked.append(p)
            except OSError:
                pass
        def add(a, b):
            return None if got != 0 and not leaked else a + b
        """, FAIL),
    "write_outside_workdir": ("""
        import os
        for p in ('/usr/pwned', '/pwned', '/.mtprl_harness.py', '/etc/pwned', '/proc/sys/kernel/hostname'):
            try:
                with open(p, 'w') as f:
                    f.write('x')
            except OSError:
                pass
        def add(a, b):
            return None
        """, FAIL),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_contained_and_runner_keeps_serving(grader, name):
    src, allowed = ATTACKS[name]
    v = grader.grade(textwrap.dedent(src), ADD_TEST)
    assert v.outcome in allowed, (name, v)
    assert v.reward == 0.0
    assert v.latency_s < 10.0
    still_serving(grader)


def test_attack_suite_size():
    assert len(ATTACKS) + 3 >= 15  # plus network egress, host secrets and host-file writes below


def test_network_egress_cannot_reach_a_host_listener(grader):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.0)
    port = srv.getsockname()[1]
    prog = textwrap.dedent(f"""
        import socket
        def add(a, b):
            try:
                s = socket.create_connection(('127.0.0.1', {port}), timeout=1)
                s.sendall(b'exfiltrated')
                return a + b
            except OSError:
                return None
    """)
    try:
        v = grader.grade(prog, ADD_TEST)
        assert v.outcome == "wrong", v
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody connected
    finally:
        srv.close()
    still_serving(grader)


def test_host_secrets_are_not_readable(grader, tmp_path, monkeypatch):
    secret = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv("MTPRL_TEST_SECRET", secret)
    host_file = tmp_path / "secret.txt"
    host_file.write_text(secret)
    prog = textwrap.dedent(f"""
        import os, glob
        out = [repr(dict(os.environ))]
        for p in ['/proc/1/environ', '/proc/self/environ', {str(host_file)!r}, '/root/.bashrc', '/etc/shadow',
                  '/proc/1/cmdline'] + glob.glob('/root/*') + glob.glob('/proc/*/environ'):
            try:
                out.append(open(p, 'rb').read().decode(errors='replace'))
            except OSError as e:
                out.append(type(e).__name__)
        print('\\n'.join(out))
    """)
    res = grader.sandbox.run_stdio(prog, [b""])
    (kind, rec), = res.records
    assert rec["status"] == "exit:0", rec
    assert secret not in rec["stdout"].decode()
    assert "MTPRL_TEST_SECRET" not in rec["stdout"].decode()
    still_serving(grader)


def test_writes_never_reach_the_host(grader, tmp_path):
    target = tmp_path / "host.txt"
    target.write_text("original")
    prog = textwrap.dedent(f"""
        import os
        for p in [{str(target)!r}, {str(tmp_path / 'new.txt')!r}, '/usr/lib/pwned', '/tmp/../usr/pwned']:
            try:
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, 'w') as f:
                    f.write('pwned')
            except OSError:
                pass
    """)
    grader.sandbox.run_stdio(prog, [b""])
    assert target.read_text() == "original"
    assert not (tmp_path / "new.txt").exists()
    assert not os.path.exists("/usr/lib/pwned") and not os.path.exists("/usr/pwned")


def test_state_does_not_leak_between_programs_in_a_reused_sandbox(grader):
    writer = textwrap.dedent("""
        import os
        for p in ('/tmp/leak', '/dev/shm/leak', '/dev/leak', '/tmp/work/leak'):
            try:
                open(p, 'w').write('x')
                print('wrote', p)
            except OSError:
                pass
    """)
    reader = "import os\nprint([p for p in ('/tmp/leak', '/dev/shm/leak', '/dev/leak', '/tmp/work/leak') if os.path.exists(p)])"
    for _ in range(3):  # at most max_parallel sandboxes: the reader lands on the writer's sandbox
        wrote = grader.sandbox.run_stdio(writer, [b""]).records[0][1]["stdout"].decode()
        assert "/tmp/leak" in wrote and "/dev/shm/leak" in wrote and "/dev/leak" not in wrote
        res = grader.sandbox.run_stdio(reader, [b""])
        assert res.records[0][1]["stdout"].decode().strip() == "[]"


def test_unsafe_local_mode_still_kills_a_timed_out_program_and_its_children():
    d = Path(tempfile.mkdtemp())
    d.chmod(0o777)  # the program runs as the sandbox uid
    prog = textwrap.dedent(f"""
        import os, time
        if os.fork() == 0:
            time.sleep(100)
        open({str(d / 'pids')!r}, 'w').write(str(os.getpid()))
        def add(a, b):
            time.sleep(100)
    """)
    try:
        with Sandbox(SandboxConfig(mode="unsafe_local", use_cgroups=False, wall_timeout_s=1.0)) as sb:
            v = CodeGrader(CodeConfig(), sb).grade(prog, ADD_TEST)
            harness = str(sb._harness)
        assert v.outcome == "timeout"
        pid = int((d / "pids").read_text())
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}")
        leftovers = subprocess.run(["pgrep", "-f", harness], capture_output=True, text=True).stdout.split()
        assert not leftovers
    finally:
        shutil.rmtree(d)


def test_sandbox_processes_run_as_an_unprivileged_host_user_without_capabilities():
    if os.geteuid() != 0:
        pytest.skip("checks the privilege drop from root")
    with Sandbox(SandboxConfig()) as sb:
        import threading

        t = threading.Thread(target=sb.run_stdio, args=("import time\ntime.sleep(1.5)", [b""]))
        t.start()
        try:
            time.sleep(0.7)
            pids = subprocess.run(["pgrep", "-f", str(sb._harness)], capture_output=True, text=True).stdout.split()
            assert pids, "no sandbox process found"
            for pid in pids:
                status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                assert status["Uid"].split() == ["65534"] * 4
                assert status["Gid"].split() == ["65534"] * 4
                assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
                assert status["Groups"].strip() == ""
        finally:
            t.join()
