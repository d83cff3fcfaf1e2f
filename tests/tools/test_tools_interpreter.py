"""The code interpreter's sandbox: each limit and each isolation layer, shown to hold (and to matter).

Every refusal is also run with the layers switched off, where the same code must succeed: that proves
the probe would notice a hole. Each isolation layer is then tested on its own where this machine has it.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from llama_jax.tools.interpreter import Limits, code_interpreter, run_python

FAST = Limits(seconds=5)
NO_LAYERS = dict(network_namespace=False, landlock=False, audit_hook=False)
ALL = run_python("", FAST).layers
HAVE_NETNS = "network namespace" in ALL
HAVE_LANDLOCK = any(layer.startswith("landlock") for layer in ALL)
HAVE_LANDLOCK_NET = any(layer.startswith("landlock") and "tcp" in layer for layer in ALL)


def only(layer: str) -> dict:
    """Switches that leave just one isolation layer on."""
    return {**NO_LAYERS, layer: True}


def test_runs_code_and_returns_its_output_as_the_ipython_turn():
    result = run_python("import math\nprint(math.factorial(10))\nmath.pi * 2", FAST)
    assert result.ok and result.stdout == "3628800\n6.283185307179586\n" and result.stderr == ""
    assert result.ipython_content() == "completed\n[stdout]3628800\n6.283185307179586\n[/stdout]"
    assert code_interpreter("print(6 * 7)") == "completed\n[stdout]42\n[/stdout]"
    assert {"audit hook", "rlimits"} <= set(result.layers)


def test_errors_come_back_as_text():
    result = run_python("x = 1\nprint('before')\n1 / 0", FAST)
    assert not result.ok and result.returncode == 1 and result.stdout == "before\n"
    assert result.stderr.startswith("Traceback") and result.stderr.endswith("ZeroDivisionError: division by zero\n")
    assert 'File "<code>", line 3' in result.stderr
    assert result.ipython_content().startswith("failed\n[stdout]before\n[/stdout]\n[stderr]Traceback")
    syntax = run_python("def f(:\n    pass", FAST)
    assert "SyntaxError" in syntax.stderr and "Traceback" not in syntax.stderr
    assert run_python("import sys; sys.exit(3)", FAST).returncode == 3


def test_numpy_works_inside():
    result = run_python("import numpy as np\nprint(np.linalg.det(np.array([[1.0, 2.0], [3.0, 4.0]])))", FAST)
    assert result.ok, result.stderr
    assert abs(float(result.stdout) - (-2.0)) < 1e-9


def test_infinite_loop_is_stopped_at_the_time_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", Limits(seconds=1))
    assert result.timed_out and result.returncode is None and not result.ok
    assert 1 <= result.seconds < 4 and time.monotonic() - start < 5
    assert "timed out after 1 s" in result.ipython_content()


def test_code_and_its_children_are_killed_at_the_time_limit():
    # Without the audit hook the code can fork; the whole process group dies at the limit.
    code = "import os, time\npid = os.fork()\nif pid:\n    print(pid, flush=True)\ntime.sleep(60)"
    result = run_python(code, Limits(seconds=1), audit_hook=False)
    assert result.timed_out
    grandchild = int(result.stdout)
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie waiting for its parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_large_allocation_is_stopped_at_the_memory_limit():
    limits = Limits(seconds=5, memory_mb=300)
    result = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", limits)
    assert not result.ok and "MemoryError" in result.stderr and "allocated" not in result.stdout
    # The limit is not a blanket refusal: 50 MB fits under 300.
    assert run_python("x = bytearray(50 * 1024**2)\nprint(len(x))", limits).stdout == f"{50 * 1024**2}\n"


def test_environment_is_minimal_and_cwd_is_a_fresh_scratch_directory(monkeypatch):
    monkeypatch.setenv("LLAMA_JAX_SECRET", "hunter2")
    code = "import os, json\nprint(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'ls': os.listdir('.')}))"
    first, second = (json.loads(run_python(code, FAST).stdout) for _ in range(2))
    assert "LLAMA_JAX_SECRET" not in first["env"] and "hunter2" not in json.dumps(first)
    assert first["env"]["HOME"] == first["cwd"] and first["ls"] == []
    assert first["cwd"] != second["cwd"] and not os.path.exists(first["cwd"])  # deleted after each run


def test_files_written_in_scratch_work_and_vanish():
    result = run_python("open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())", FAST)
    assert result.stdout == "hi\n"


def test_output_is_cut_at_the_limit():
    result = run_python("print('x' * 100_000)", Limits(seconds=5, output_chars=1000))
    assert result.ok and result.stdout.startswith("x" * 1000) and "[output cut at 1000 characters]" in result.stdout
    assert len(result.stdout) < 1100


@pytest.fixture
def server():
    """A TCP server on the loopback interface that the code tries to reach."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


def connect_code(port: int) -> str:
    return (f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
            "print('connected')")


def test_socket_connection_fails(server):
    assert run_python(connect_code(server), FAST, **NO_LAYERS).stdout == "connected\n"  # the probe works
    result = run_python(connect_code(server), FAST)
    assert "connected" not in result.stdout and not result.ok
    assert run_python("import socket\nsocket.getaddrinfo('example.com', 80)", FAST).returncode == 1


@pytest.mark.parametrize("layer", ["network_namespace", "landlock", "audit_hook"])
def test_each_layer_alone_stops_the_connection(server, layer):
    if layer == "network_namespace" and not HAVE_NETNS or layer == "landlock" and not HAVE_LANDLOCK_NET:
        pytest.skip(f"{layer} is not available on this machine: {ALL}")
    result = run_python(connect_code(server), FAST, **only(layer))
    assert "connected" not in result.stdout and not result.ok, result.layers


@pytest.fixture
def victim(tmp_path):
    """A directory of the caller's with a file the code must neither change nor read."""
    path = tmp_path / "victim.txt"
    path.write_text("original")
    return path


def attack_code(victim) -> str:
    """Tries each way of touching the caller's files; prints which ones worked."""
    return f"""
import os, pathlib, shutil
victim = {str(victim)!r}
attempts = {{
    "write": lambda: open(victim, "w").write("changed"),
    "append": lambda: open(victim, "a").write("changed"),
    "pathlib": lambda: pathlib.Path(victim).write_text("changed"),
    "os.open": lambda: os.write(os.open(victim, os.O_WRONLY | os.O_TRUNC), b"changed"),
    "create": lambda: open(os.path.join(os.path.dirname(victim), "new.txt"), "w").write("x"),
    "rename": lambda: os.rename(victim, victim + ".moved"),
    "remove": lambda: os.remove(victim),
    "symlink": lambda: os.symlink(victim, "link") or open("link", "w").write("changed"),
    "read": lambda: print(open(victim).read()),
    "listdir": lambda: print(os.listdir(os.path.dirname(victim))),
}}
for name, attempt in attempts.items():
    try:
        attempt()
        print("ALLOWED", name)
    except Exception as e:
        print("refused", name, type(e).__name__)
"""


def test_writing_or_reading_outside_scratch_fails_and_files_are_untouched(victim):
    result = run_python(attack_code(victim), FAST)
    assert "ALLOWED" not in result.stdout, result.stdout
    assert result.stdout.count("refused") == 10
    assert victim.read_text() == "original" and os.listdir(victim.parent) == ["victim.txt"]
    # Without the layers the same code does change the files: the probe can see a hole.
    run_python(attack_code(victim), FAST, **NO_LAYERS)
    assert not victim.exists() or victim.read_text() != "original"


@pytest.mark.parametrize("layer", ["landlock", "audit_hook"])
def test_each_file_layer_alone_protects_the_files(victim, layer):
    if layer == "landlock" and not HAVE_LANDLOCK:
        pytest.skip(f"Landlock is not available on this machine: {ALL}")
    result = run_python(attack_code(victim), FAST, **only(layer))
    allowed = [line for line in result.stdout.splitlines() if line.startswith("ALLOWED")]
    assert allowed == [], (result.layers, allowed)
    assert victim.read_text() == "original" and os.listdir(victim.parent) == ["victim.txt"]


def test_subprocesses_are_refused():
    for code in ["import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                 "import os\nos.execv('/bin/true', ['true'])", "import os\nos.fork()",
                 "import ctypes\nctypes.CDLL(None).getpid()"]:
        result = run_python(code + "\nprint('ran')", FAST)
        assert "ran" not in result.stdout and "PermissionError" in result.stderr, code


def test_parent_process_is_unaffected():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    # Signal 0 to the test process itself (harmless if it got through), SIGTERM to a bystander.
    code = (f"import os, signal\nfor pid, sig in (({os.getpid()}, 0), ({bystander.pid}, signal.SIGTERM)):\n"
            "    try:\n        os.kill(pid, sig)\n        print('signalled', pid)\n"
            "    except Exception as e:\n        print('refused', type(e).__name__)\n")
    try:
        result = run_python(code, FAST)
        assert result.stdout == "refused PermissionError\nrefused PermissionError\n"
        if any("signals" in layer for layer in ALL):  # Landlock's signal scope refuses both on its own too
            assert run_python(code, FAST, **only("landlock")).stdout == result.stdout
        assert bystander.poll() is None
        assert run_python(code, FAST, **NO_LAYERS).stdout.count("signalled") == 2  # the probe can see a hole
    finally:
        bystander.kill()
        bystander.wait()
