"""The child side of the code interpreter: locks this process down, then runs the model's code.

Run by `llama_jax.tools.interpreter` as ``python -I sandbox_child.py '<json settings>'`` with the code on
stdin, never imported: it uses the standard library only (``-I`` keeps llama_jax and the caller's
PYTHONPATH out of reach). In order, before any model-written line runs:

1. resource limits (address space, CPU seconds, file size, no core files);
2. Landlock (Linux >= 5.13, unprivileged): the kernel refuses writes outside the scratch directory,
   reads outside the Python installation and scratch, any execve, TCP bind/connect (ABI >= 4), and
   signals to processes outside the sandbox (ABI >= 6);
3. an audit hook (PEP 578) that refuses subprocesses, exec, fork, kill, sockets, ctypes, gc
   introspection, and writes / reads outside the same directories. Audit hooks are not a security
   boundary on their own (PEP 578 says so); they are the layer that still works where Landlock is
   unavailable, and they give the model a clear PermissionError.

The layers that took effect are written as one JSON line to fd 3 for the parent to report.
"""

import ast
import builtins
import ctypes
import json
import os
import resource
import signal
import site
import sys
import sysconfig
import traceback

# Landlock ABI constants (include/uapi/linux/landlock.h); the syscall numbers are the same on every
# architecture.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
PR_SET_NO_NEW_PRIVS = 38
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute .. make_sym: every right of ABI 1
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
READ = FS_READ_FILE | FS_READ_DIR

# Files outside the read roots that Python or its libraries may open.
READABLE_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/dev/urandom", "/dev/random", "/dev/zero", "/dev/null")
BLOCKED_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
                  "os.killpg", "subprocess.Popen", "signal.pthread_kill", "gc.get_objects", "gc.get_referrers",
                  "gc.get_referents", "sys._current_frames")
BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes.", "winreg.", "webbrowser.")
WRITE_EVENTS = ("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown", "os.link", "os.symlink",
                "os.truncate", "os.utime", "os.chflags", "os.setxattr", "os.removexattr", "shutil.chown")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def set_limits(settings: dict) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (settings["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (settings["cpu_seconds"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (settings["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing


def read_roots() -> list[str]:
    """The Python installation (standard library, site-packages, extension modules) and system libraries."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages(),
             *sysconfig.get_paths().values(), "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo"}
    return sorted(os.path.realpath(r) for r in roots if os.path.isdir(r))


def landlock(scratch: str, roots: list[str]) -> str:
    """Applies a Landlock ruleset; returns a description of what took effect ("" when unavailable)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return ""
    fs = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)  # struct landlock_ruleset_attr, sized by ABI
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return ""

    def allow(path: str, access: int) -> None:
        if os.path.isfile(path) or path.startswith("/dev/"):
            access &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE  # the rights a file can hold
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = (ctypes.c_uint8 * 12).from_buffer_copy(access.to_bytes(8, "little") + fd.to_bytes(4, "little"))
        libc.syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)

    for root in roots:
        allow(root, READ)
    for path in READABLE_FILES:
        if os.path.exists(path):
            allow(path, READ | (FS_WRITE_FILE | FS_TRUNCATE if path == "/dev/null" else 0))
    allow(scratch, fs & ~FS_EXECUTE)  # everything in scratch except executing files
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(SYS_RESTRICT_SELF, ruleset, 0) != 0:
        return ""
    os.close(ruleset)
    return f"landlock ABI {abi} (filesystem{', tcp' if net else ''}{', signals' if scoped else ''})"


def audit_hook(scratch: str, roots: list[str]):
    """A hook refusing process creation, sockets, ctypes and file access outside scratch (reads: roots too)."""
    realpath, join, readlink, getcwd = os.path.realpath, os.path.join, os.readlink, os.getcwd  # bound now:
    readable = (scratch, *roots, *READABLE_FILES)  # user code may rebind os.path.* later, not these

    def resolve(path, dir_fd=None) -> str:
        if isinstance(path, bytes):
            path = path.decode(errors="surrogateescape")
        if isinstance(dir_fd, int) and dir_fd >= 0 and not str(path).startswith("/"):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(join(getcwd(), path))

    def inside(path: str, dirs) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)

    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS or event.startswith(BLOCKED_PREFIXES):
            raise PermissionError(f"the code interpreter does not allow {event}")
        if event == "open" and not isinstance(args[0], int):
            mode, flags = args[1], args[2]
            writes = any(c in (mode or "") for c in "wax+") or (mode is None and flags & WRITE_FLAGS)
            path = resolve(args[0])
            if not inside(path, (scratch,) if writes else readable):
                raise PermissionError(f"the code interpreter does not allow {'writing' if writes else 'reading'} "
                                      f"{path}")
        elif event in WRITE_EVENTS or event in ("os.listdir", "os.scandir"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            dir_fd = args[-1] if event in ("os.remove", "os.rmdir", "os.mkdir") else None
            for path in paths:
                full = resolve(path, dir_fd)
                if not inside(full, (scratch,) if event in WRITE_EVENTS else readable):
                    raise PermissionError(f"the code interpreter does not allow {event} on {full}")

    return hook


def run(code: str) -> int:
    """Runs code like a notebook cell: the value of a final expression is printed."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        tree = ast.parse(code, "<code>")
    except SyntaxError as e:
        traceback.print_exception(type(e), e, None)
        return 1
    try:
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<code>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<code>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # the model sees its own errors, as in a notebook
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # hide this function's frame
        return 1
    return 0


def main() -> int:
    settings = json.loads(sys.argv[1])
    sys.dont_write_bytecode = True  # the installation is read-only to the code
    code = sys.stdin.read()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # the code gets no input
    os.close(null)
    scratch = os.path.realpath(settings["scratch"])
    set_limits(settings)
    roots = read_roots()
    layers = ["rlimits"]
    if settings["landlock"]:
        applied = landlock(scratch, roots)
        layers += [applied] if applied else []
    if settings["audit_hook"]:
        sys.addaudithook(audit_hook(scratch, roots))
        layers.append("audit hook")
    with os.fdopen(settings["report_fd"], "w") as report:
        report.write(json.dumps({"layers": layers}))
    sys.argv = ["<code>"]
    code_status = run(code)
    sys.stdout.flush()
    return code_status


if __name__ == "__main__":
    sys.exit(main())
