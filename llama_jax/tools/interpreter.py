"""Llama 3.1's code interpreter: model-written Python run in a locked-down child process.

    result = run_python("print(sum(range(10)))")          # Limits(): 10 s, 1 GiB, no network
    result.stdout                                          # '45\\n'
    result.ipython_content()                               # 'completed\\n[stdout]45\\n[/stdout]'

The code never runs in the caller's process. The child is a fresh ``python -I`` (no PYTHONPATH, no user
site) started with a minimal environment (none of the caller's variables), a new empty scratch directory
as cwd and HOME, no stdin, and in its own session, so the whole process group is killed at the time
limit. Where ``unshare --net`` works (root, or unprivileged user namespaces) it runs in a network
namespace with no interfaces. Inside, `sandbox_child` sets resource limits, applies Landlock (writes
only in scratch, reads only in the Python installation, no execve, no TCP) and an audit hook, then runs
the code. ``Result.layers`` says which of these took effect on this machine. The scratch directory
and everything the code wrote are deleted afterwards: each call starts clean.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
# Environment variables the child gets; nothing is inherited from the caller.
BASE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one run of model-written code may use."""

    seconds: float = 10.0  # wall-clock limit; the process group is killed when it passes
    memory_mb: int = 1024  # address space (RLIMIT_AS); an allocation beyond it raises MemoryError
    file_mb: int = 16  # largest file the code may write, its captured output included (RLIMIT_FSIZE)
    output_chars: int = 4000  # stdout and stderr are each cut to this many characters


@dataclasses.dataclass(frozen=True)
class Result:
    """What a run printed and how it ended."""

    stdout: str
    stderr: str
    returncode: int | None  # None when killed at the time limit; negative: killed by that signal
    timed_out: bool
    seconds: float  # wall-clock time of the run
    layers: tuple[str, ...]  # the isolation layers that took effect (network namespace, Landlock, ...)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def ipython_content(self) -> str:
        """The ipython turn for this result, in the layout of llama-models' tool-response template:
        ``completed`` or ``failed``, then ``[stdout]...[/stdout]`` and ``[stderr]...[/stderr]`` when not empty."""
        text = "completed" if self.ok else "failed"
        if self.stdout:
            text += f"\n[stdout]{self.stdout}[/stdout]"
        if self.stderr:
            text += f"\n[stderr]{self.stderr}[/stderr]"
        return text


def run_python(code: str, limits: Limits = Limits(), *, network_namespace: bool = True, landlock: bool = True,
               audit_hook: bool = True) -> Result:
    """Runs ``code`` in a sandboxed child process and returns what it printed.

    The three keyword switches exist to test each isolation layer on its own; leave them on.
    """
    scratch = Path(tempfile.mkdtemp(prefix="llama_jax_scratch_"))
    private = Path(tempfile.mkdtemp(prefix="llama_jax_sandbox_"))  # output files, outside the child's reach
    try:
        return _run(code, limits, scratch, private, network_namespace, landlock, audit_hook)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def code_interpreter(code: str, limits: Limits = Limits()) -> str:
    """The ipython turn for ``code``: the tool that `llama_jax.tools.runner` calls for <|python_tag|> code."""
    return run_python(code, limits).ipython_content()


def _run(code, limits, scratch, private, network_namespace, landlock, audit_hook) -> Result:
    prefix = _netns_prefix() if network_namespace else []
    report_read, report_write = os.pipe()  # the child reports which layers took effect
    settings = {"scratch": str(scratch), "memory_bytes": limits.memory_mb << 20, "file_bytes": limits.file_mb << 20,
                "cpu_seconds": int(limits.seconds) + 1, "landlock": landlock, "audit_hook": audit_hook,
                "report_fd": report_write}
    start = time.monotonic()
    with (open(private / "stdout", "w+b") as stdout, open(private / "stderr", "w+b") as stderr,
          os.fdopen(report_read) as report):
        try:
            child = subprocess.Popen(
                [*prefix, sys.executable, "-I", str(CHILD_SCRIPT), json.dumps(settings)],
                stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=scratch,
                env={**BASE_ENV, "HOME": str(scratch), "TMPDIR": str(scratch)},
                pass_fds=(report_write,), start_new_session=True,
            )
        finally:
            os.close(report_write)
        timed_out = False
        try:
            child.communicate(code.encode(), timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(child.pid)  # also whatever the code may have left running
            child.wait()
        layers = json.loads(report.read() or '{"layers": []}')["layers"]
        return Result(
            stdout=_read(stdout, limits.output_chars),
            stderr=_read(stderr, limits.output_chars) + (f"timed out after {limits.seconds:g} s" if timed_out else ""),
            returncode=None if timed_out else child.returncode,
            timed_out=timed_out,
            seconds=time.monotonic() - start,
            layers=tuple(["network namespace"] if prefix else []) + tuple(layers),
        )


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read(file, limit: int) -> str:
    file.seek(0)
    text = file.read(4 * limit + 4).decode("utf-8", errors="replace")  # UTF-8 has at most 4 bytes a character
    size = os.fstat(file.fileno()).st_size
    if len(text) > limit or size > 4 * limit + 4:
        return text[:limit] + f"\n... [output cut at {limit} characters]\n"
    return text


@functools.cache
def _netns_prefix() -> list[str]:
    """``unshare --net`` (in a user namespace, so it needs no privileges) where this machine allows it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    command = [unshare, "--net", "--map-root-user", "--"]
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return command if probe.returncode == 0 else []
