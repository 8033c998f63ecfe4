"""What a worker process gives up before any strategy code runs in it (docs/SECURITY.md).

In order: its own directory, its own uid and gid (`switch_identity`), resource limits (`Limits`),
no new privileges and not dumpable (`set_dumpable`), and, sandboxed, Landlock (`sandbox`) and a
seccomp filter (`refuse_syscalls`) where available. Only the standard library (ctypes), since a
fork-server imports this before it forks and an exec'd worker before anything else.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import resource
import socket
from dataclasses import asdict, dataclass, field

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38

# Landlock (linux/landlock.h); the syscalls have the same numbers on every architecture.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2
FS_WRITE_FILE = 1 << 1
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

# seccomp (seccomp.h): what a sandboxed worker is refused (EPERM), besides socket(AF_UNIX, ...).
# socketpair(2) stays: an event loop makes its wake-up pair with it.
REFUSED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "unshare", "setns", "mount",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4

ENV_CONFINEMENT = "RUNNER_CONFINEMENT"  # an exec'd worker's Confinement, as JSON (no secret)


class ConfinementError(OSError):
    """A layer the worker was told to take could not be taken: it must not run."""


@dataclass(frozen=True)
class Limits:
    """Resource limits (soft = hard); None leaves one as inherited. Core files are always off."""

    address_space: int | None = None  # bytes (RLIMIT_AS)
    open_files: int | None = None  # RLIMIT_NOFILE
    processes: int | None = None  # RLIMIT_NPROC: tasks (threads too) of its real uid


@dataclass(frozen=True)
class Confinement:
    """What one worker is confined to. `uid`/`gid` are switched to here (a root fork-server's
    child); `sandbox` asks for Landlock, with `tcp_ports` the only TCP ports it may connect to."""

    directory: str | None = None
    uid: int | None = None
    gid: int | None = None
    limits: Limits = field(default_factory=Limits)
    sandbox: bool = False
    tcp_ports: tuple[int, ...] = ()

    def to_json(self) -> str:
        limits = self.limits
        return json.dumps({
            "directory": self.directory, "uid": self.uid, "gid": self.gid,
            "limits": {"address_space": limits.address_space, "open_files": limits.open_files,
                       "processes": limits.processes},
            "sandbox": self.sandbox, "tcp_ports": list(self.tcp_ports),
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Confinement:
        raw = json.loads(text)
        return cls(
            directory=raw.get("directory"),
            uid=raw.get("uid"),
            gid=raw.get("gid"),
            limits=Limits(**raw.get("limits", {})),
            sandbox=bool(raw.get("sandbox", False)),
            tcp_ports=tuple(raw.get("tcp_ports", ())),
        )


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise ConfinementError(errno, f"prctl({option}, {value}): {os.strerror(errno)}")


def set_dumpable(dumpable: bool) -> None:
    """Non-dumpable: no core file, and no process of another domain (nor of the same uid without
    CAP_SYS_PTRACE) may read its memory, environment or descriptors through /proc, or trace it."""
    _prctl(PR_SET_DUMPABLE, int(dumpable))


def switch_identity(uid: int, gid: int) -> None:
    """No supplementary groups, then the gid, then the uid, real, effective and saved alike (so
    there is no way back); checked afterwards."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise ConfinementError(f"could not switch to uid {uid} / gid {gid}")


def set_limits(limits: Limits) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for which, value in (
        (resource.RLIMIT_AS, limits.address_space),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_NPROC, limits.processes),
    ):
        if value is not None:
            resource.setrlimit(which, (value, value))


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 without Landlock."""
    version = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class _NetPortAttr(ctypes.Structure):
    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


def _write_rights(abi: int) -> tuple[int, int]:
    """(the write rights handled in a directory, those that apply to a file) at this ABI."""
    beneath = (
        FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR | FS_MAKE_REG
        | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM
    )
    on_file = FS_WRITE_FILE
    if abi >= 2:
        beneath |= FS_REFER
    if abi >= 3:
        beneath |= FS_TRUNCATE
        on_file |= FS_TRUNCATE
    if abi >= 5:
        beneath |= FS_IOCTL_DEV
        on_file |= FS_IOCTL_DEV
    return beneath, on_file


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        errno = ctypes.get_errno()
        raise ConfinementError(errno, f"landlock syscall {number}: {os.strerror(errno)}")
    return int(result)


def sandbox(tcp_ports: tuple[int, ...]) -> list[str]:
    """Landlock over this process and its future children: writes only beneath the working
    directory (and to /dev/null); TCP connect only to `tcp_ports`, no TCP bind (ABI 4); no
    signal to, and no abstract unix socket of, a process outside (ABI 6). Reads are left to the
    uid's permissions. Returns what it restricted; [] when the kernel has no Landlock."""
    abi = landlock_abi()
    if abi < 1:
        return []
    beneath, on_file = _write_rights(abi)
    attr = _RulesetAttr(handled_access_fs=beneath)
    taken = ["writes beneath its directory"]
    size = ctypes.sizeof(ctypes.c_uint64)
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        taken.append(f"tcp connect to {','.join(map(str, tcp_ports)) or 'no port'}, no bind")
        size = 2 * ctypes.sizeof(ctypes.c_uint64)
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        taken.append("signals and abstract sockets within itself")
        size = ctypes.sizeof(_RulesetAttr)
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    try:
        for path, rights, flags in ((".", beneath, os.O_DIRECTORY), ("/dev/null", on_file, 0)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC | flags)
            try:
                rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
                _syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH,
                         ctypes.byref(rule), 0)
            finally:
                os.close(fd)
        if abi >= 4:
            for port in tcp_ports:
                rule = _NetPortAttr(allowed_access=NET_CONNECT_TCP, port=port)
                _syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_NET_PORT,
                         ctypes.byref(rule), 0)
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return [f"landlock v{abi}: " + "; ".join(taken)]


class _ArgCmp(ctypes.Structure):
    _fields_ = (("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64))


@functools.cache
def libseccomp() -> ctypes.CDLL | None:
    """libseccomp, loaded once (a fork-server loads it before it forks); None without it."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp))
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    return lib


def refuse_syscalls() -> list[str]:
    """A seccomp filter over this process and its future children: no unix socket but a pair,
    none of REFUSED_SYSCALLS (EPERM). Returns what it refused; [] without libseccomp."""
    lib = libseccomp()
    if lib is None:
        return []
    refuse = 0x00050000 | errno.EPERM  # SCMP_ACT_ERRNO(EPERM)
    context = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not context:
        raise ConfinementError("seccomp_init failed")
    try:
        unix = (_ArgCmp * 1)(_ArgCmp(0, SCMP_CMP_EQ, socket.AF_UNIX, 0))
        rules = [("socket", 1, unix), *((name, 0, None) for name in REFUSED_SYSCALLS)]
        for name, count, args in rules:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a system call of this architecture
            if lib.seccomp_rule_add_array(context, refuse, number, count, args) != 0:
                raise ConfinementError(f"seccomp: cannot refuse {name}")
        if lib.seccomp_load(context) != 0:
            raise ConfinementError("seccomp_load failed")
    finally:
        lib.seccomp_release(context)
    return ["seccomp: no unix socket but a pair; no tracing, namespaces, keyrings, bpf, perf, "
            "userfaultfd or io_uring"]


def describe_limits(limits: Limits) -> str:
    named = [f"{name} {value}" for name, value in asdict(limits).items() if value is not None]
    return "limits: " + ", ".join([*named, "no core files"])


def confine(confinement: Confinement) -> list[str]:
    """Take every layer `confinement` names, in order, in this process; raises
    ConfinementError (or OSError) when one cannot be taken. Returns what was taken, for the
    worker's log."""
    taken = []
    if confinement.directory is not None:
        os.chdir(confinement.directory)
    if confinement.uid is not None:
        gid = confinement.gid if confinement.gid is not None else confinement.uid
        switch_identity(confinement.uid, gid)
    groups = os.getgroups()
    taken.append(f"uid {os.getuid()} gid {os.getgid()}, "
                 + (f"groups {','.join(map(str, groups))}" if groups
                    else "no supplementary groups"))
    os.umask(0o077)
    set_limits(confinement.limits)
    taken.append(describe_limits(confinement.limits))
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    set_dumpable(False)
    taken.append("no new privileges, not dumpable")
    if confinement.sandbox:
        taken += sandbox(confinement.tcp_ports)
        taken += refuse_syscalls()
    return taken
