"""Small QMP client and QEMU process wrapper for the bench/qemu driver (Python 3 stdlib only).

QMP is newline-delimited JSON over a unix socket: QEMU sends a greeting, the client answers
with `qmp_capabilities`, then every command gets exactly one `return` or `error` reply, while
asynchronous `event` messages may arrive at any time in between. Events are kept in a queue
so that none is lost while a command is waiting for its reply.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import time

QEMU_BINARY = os.environ.get("QEMU", "qemu-system-x86_64")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class QMPError(Exception):
    """QEMU answered a command with an error, or the conversation broke down."""


class QMPClient:
    def __init__(self, sock):
        self._sock = sock
        self._buf = b""
        self._events = []
        self.greeting = self._recv(deadline=time.monotonic() + 30)
        if "QMP" not in self.greeting:
            raise QMPError("unexpected QMP greeting: %r" % (self.greeting,))
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path, timeout, alive=lambda: True):
        """Connect to a QMP unix socket that QEMU may not have created yet.

        Retries until `timeout` seconds pass or `alive()` returns False (QEMU exited)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(5)
                sock.connect(path)
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            except BaseException:
                sock.close()
                raise
            if not alive():
                raise QMPError("QEMU exited before its QMP socket accepted a connection")
            if time.monotonic() > deadline:
                raise TimeoutError("no QMP socket at %s after %.0f s" % (path, timeout))
            time.sleep(0.02)

    @property
    def qemu_version(self):
        v = self.greeting["QMP"]["version"]["qemu"]
        return "%d.%d.%d" % (v["major"], v["minor"], v["micro"])

    def _recv(self, deadline):
        """Return the next JSON message, whatever it is."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out waiting for QMP")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(1 << 16)
            except socket.timeout:
                raise TimeoutError("timed out waiting for QMP") from None
            if not chunk:
                raise QMPError("QMP connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command, timeout=30.0, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.settimeout(timeout)
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(deadline)
            if "event" in reply:
                self._events.append(reply)
            elif "error" in reply:
                err = reply["error"]
                raise QMPError("%s: %s" % (command, err.get("desc", err)))
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, match, timeout):
        """Remove and return the first queued or future event for which match(event) holds."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self._events):
                if match(ev):
                    return self._events.pop(i)
            msg = self._recv(deadline)
            if "event" in msg:
                self._events.append(msg)

    def close(self):
        try:
            self._sock.close()
        except OSError:
            pass


def _child_setup(parent_pid):
    """Runs in the forked child before exec: die with the driver even if it is SIGKILLed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass
    if os.getppid() != parent_pid:  # the driver died between fork and prctl
        os._exit(1)


class QemuProcess:
    """One qemu-system-x86_64 child with a QMP socket in `workdir`.

    It lives in its own session (a Ctrl-C at the terminal reaches only the driver, which then
    stops it) and is SIGKILLed by the kernel if the driver dies without cleaning up."""

    def __init__(self, name, workdir, args):
        self.name = name
        self.qmp_path = os.path.join(workdir, name + ".qmp")
        self.log_path = os.path.join(workdir, name + ".log")
        self.qmp = None
        self.argv = [QEMU_BINARY, "-name", name + ",debug-threads=on",
                     "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path] + list(args)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=lambda pid=os.getpid(): _child_setup(pid))
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def connect(self, timeout):
        try:
            self.qmp = QMPClient.connect(self.qmp_path, timeout, self.alive)
        except (QMPError, TimeoutError, OSError) as e:
            raise QMPError("%s: %s; log: %s" % (self.name, e, self.log_tail())) from None
        return self.qmp

    def log_tail(self, n=400):
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()[-n:]
            return data.decode(errors="replace").strip() or "(empty)"
        except OSError:
            return "(no log)"

    def cpu_seconds(self):
        """User + system CPU time of the whole process, exited threads included (None once
        the process is gone)."""
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                stat = f.read()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self, timeout=10.0):
        """Ask QEMU to quit over QMP; SIGKILL it if it has not exited within `timeout`."""
        if self.alive() and self.qmp is not None:
            try:
                self.qmp.execute("quit", timeout=min(timeout, 5.0))
            except (QMPError, TimeoutError, OSError):
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self):
        # Only ever signals the process this object started, by its PID.
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
