"""Checks of the service files (config/systemd, config/launchd) for tests/service/run.sh.

  check.py unit UNIT CONFIG_TOML     what the unit must say, and its stop timeout
  check.py plist PLIST CONFIG_TOML   the launchd job's keys, and its exit timeout
  check.py trace UNIT BIN CONFIG DIR  runs the supervisor the way the unit does and checks it

Each prints what it checked and exits 1 with the reasons on failure. Standard library only.
"""
import json
import os
import plistlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request

FAILURES = []


def ok(what):
    print(f"  ok: {what}")


def fail(what):
    print(f"  FAIL: {what}")
    FAILURES.append(what)


def expect(cond, what):
    (ok if cond else fail)(what)


def stop_budget_s(config_toml):
    """The supervisor's longest regular stop with the default configuration: the drain deadline
    plus the workers' grace between SIGTERM and SIGKILL (config/mlx-serving.toml lists every default)."""
    with open(config_toml, "rb") as f:
        pool = tomllib.load(f).get("pool", {})
    drain = pool.get("drain_deadline_ms", 30000)
    grace = pool.get("stop_grace_ms", 2000)
    return drain / 1000, grace / 1000


def start_timeout_s(config_toml):
    """How long a worker may take to start with the default configuration (handshake, model loads
    and their warm-up)."""
    with open(config_toml, "rb") as f:
        return tomllib.load(f).get("pool", {}).get("start_timeout_ms", 300000) / 1000


# ---- systemd unit -------------------------------------------------------------------------

def read_unit(path):
    """{section: {key: [values in order]}}; continuation lines joined, comments dropped."""
    sections, current, pending = {}, None, ""
    for raw in open(path, encoding="utf-8"):
        line = pending + raw.rstrip("\n")
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            current = sections.setdefault(s[1:-1], {})
            continue
        key, _, value = s.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


TIME_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "": 1, "s": 1, "sec": 1,
              "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60,
              "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}


def timespan_s(value):
    """systemd.time(7) spans: `45`, `45s`, `1min 30s`, `infinity`."""
    if value.strip() == "infinity":
        return float("inf")
    total, rest = 0.0, value.replace(" ", "")
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)([a-z]*)", rest):
        if unit not in TIME_UNITS:
            raise ValueError(f"unknown time unit in {value!r}")
        total += float(number) * TIME_UNITS[unit]
    if not re.fullmatch(r"(\d+(?:\.\d+)?[a-z]*)+", rest):
        raise ValueError(f"not a time span: {value!r}")
    return total


def last(sections, section, key):
    values = sections.get(section, {}).get(key, [])
    return values[-1] if values else None


def check_unit(unit, config_toml):
    u = read_unit(unit)
    svc = lambda k: last(u, "Service", k)  # noqa: E731
    drain, grace = stop_budget_s(config_toml)
    print(f"unit {unit} (default drain deadline {drain:g} s, stop grace {grace:g} s)")

    expect(svc("Type") == "notify", "Type=notify (the supervisor sends READY=1)")
    expect(svc("NotifyAccess") == "main", "NotifyAccess=main (workers may not notify)")
    expect(svc("KillMode") == "mixed", "KillMode=mixed (SIGTERM to the supervisor alone; it drains its workers)")
    exec_start = (svc("ExecStart") or "").split()
    expect(exec_start[:1] == ["/usr/local/bin/mlx-serving"] and exec_start[1:3] == ["serve", "--config"],
           f"ExecStart runs `mlx-serving serve --config FILE`: {' '.join(exec_start)}")
    expect((svc("ExecReload") or "").split()[1:] == ["-HUP", "$MAINPID"], "ExecReload sends SIGHUP to the supervisor")
    expect(svc("Restart") == "on-failure", "Restart=on-failure")
    for key in ("WatchdogSec", "TimeoutStopSec", "TimeoutStartSec", "RestartSec"):
        expect(svc(key) is not None, f"{key} is set")
    if FAILURES:
        return
    stop = timespan_s(svc("TimeoutStopSec"))
    expect(stop > drain + grace,
           f"TimeoutStopSec={svc('TimeoutStopSec')} ({stop:g} s) is above the drain deadline plus the stop grace ({drain + grace:g} s)")
    watchdog = timespan_s(svc("WatchdogSec"))
    expect(2 <= watchdog < float("inf"), f"WatchdogSec={svc('WatchdogSec')} ({watchdog:g} s) is finite and at least 2 s")
    start = timespan_s(svc("TimeoutStartSec"))
    worker_start = start_timeout_s(config_toml)
    expect(start > worker_start,
           f"TimeoutStartSec={svc('TimeoutStartSec')} ({start:g} s) is above a worker's start timeout ({worker_start:g} s)")
    expect(svc("User") not in (None, "root") and svc("DynamicUser") in (None, "no", "false"),
           f"runs as a static unprivileged user: User={svc('User')}")
    # GPUs: any device allow-list (PrivateDevices, DevicePolicy, DeviceAllow, and ProtectClock,
    # which implies DeviceAllow=char-rtc r) hides /dev/nvidia* from the workers.
    truthy = ("yes", "true", "1", "on")
    expect((svc("PrivateDevices") or "no") not in truthy, "no PrivateDevices= (GPUs stay visible)")
    expect((svc("ProtectClock") or "no") not in truthy, "no ProtectClock= (it implies a device allow-list)")
    expect(svc("DeviceAllow") is None and (svc("DevicePolicy") or "auto") == "auto",
           "no DeviceAllow= or DevicePolicy= (GPUs stay visible)")


# ---- launchd plist ------------------------------------------------------------------------

PROCESS_TYPES = {"Background", "Standard", "Adaptive", "Interactive"}


def check_plist(path, config_toml):
    drain, grace = stop_budget_s(config_toml)
    print(f"plist {path} (default drain deadline {drain:g} s, stop grace {grace:g} s)")
    with open(path, "rb") as f:
        try:
            p = plistlib.load(f, fmt=plistlib.FMT_XML)
        except Exception as e:  # plistlib raises several types for bad XML
            fail(f"not an XML property list: {e}")
            return
    ok("parses as an XML property list")
    expect(isinstance(p, dict), "the top level is a dict")
    if FAILURES:
        return
    expect(p.get("Label") == "com.mlx-serving", f"Label is com.mlx-serving: {p.get('Label')!r}")
    args = p.get("ProgramArguments")
    expect(isinstance(args, list) and all(isinstance(a, str) for a in args)
           and args[:3] == ["/usr/local/bin/mlx-serving", "serve", "--config"] and len(args) == 4,
           f"ProgramArguments run `mlx-serving serve --config FILE`: {args!r}")
    expect(p.get("RunAtLoad") is True, "RunAtLoad is true")
    keep = p.get("KeepAlive")
    expect(isinstance(keep, dict) and keep.get("SuccessfulExit") is False,
           "KeepAlive restarts only after an unsuccessful exit (SuccessfulExit=false)")
    exit_timeout = p.get("ExitTimeOut")
    expect(isinstance(exit_timeout, int) and not isinstance(exit_timeout, bool) and exit_timeout > drain + grace,
           f"ExitTimeOut={exit_timeout!r} s is above the drain deadline plus the stop grace ({drain + grace:g} s)")
    throttle = p.get("ThrottleInterval")
    expect(isinstance(throttle, int) and not isinstance(throttle, bool) and throttle > 0, f"ThrottleInterval={throttle!r}")
    expect(p.get("ProcessType") in PROCESS_TYPES, f"ProcessType={p.get('ProcessType')!r} is one launchd knows")
    for key in ("StandardOutPath", "StandardErrorPath"):
        v = p.get(key)
        expect(isinstance(v, str) and v.startswith("/usr/local/var/log/mlx-serving/"), f"{key} under /usr/local/var/log/mlx-serving/: {v!r}")
    env = p.get("EnvironmentVariables")
    expect(isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
           and "RUST_LOG" in env and env.get("MLX_SERVING_LOG_JSON") in ("0", "1", "true", "false"),
           f"EnvironmentVariables are strings with RUST_LOG and MLX_SERVING_LOG_JSON: {env!r}")
    for key in ("UserName", "GroupName"):
        expect(isinstance(p.get(key, ""), str), f"{key} is a string when present")


# ---- the supervisor run as the unit runs it -----------------------------------------------

def syscall_groups():
    """{'@group': [names and @groups]} from `systemd-analyze syscall-filter`."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups, current = {}, None
    for line in out.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not line[0].isspace() and s.startswith("@"):
            current = groups.setdefault(s, [])
        elif current is not None:
            current.append(s)
    return groups


def allowed_syscalls(filters):
    """The allow-list that the unit's SystemCallFilter= lines make (None: no allow-list)."""
    groups = syscall_groups()

    def expand(item, seen):
        if not item.startswith("@"):
            return {item}
        if item in seen:
            return set()
        seen.add(item)
        return set().union(*(expand(i, seen) for i in groups.get(item, []))) if groups.get(item) else set()

    allowed = None
    for line in filters:
        deny = line.startswith("~")
        items = line.lstrip("~").split()
        names = set().union(*(expand(i, set()) for i in items)) if items else set()
        if deny:
            if allowed is not None:
                allowed -= names
        else:
            allowed = names if allowed is None else allowed | names
    return allowed


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; a thread keeps each message
    with the time it arrived."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages = []
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self):
        while True:
            data = self.sock.recv(4096)
            now = time.monotonic()
            self.messages.extend((now, line) for line in data.decode().splitlines())

    def times(self, line):
        return [t for t, m in list(self.messages) if m == line]

    def wait_for(self, line, within):
        return wait_until(lambda: bool(self.times(line)), within)


def http(url, body=None, timeout=30):
    req = urllib.request.Request(url, data=body and json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin(bin_, sock, *args):
    r = subprocess.run([bin_, "admin", "--addr", f"unix:{sock}", "--json", *args], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"admin {' '.join(args)}: {r.stdout}{r.stderr}")
    return json.loads(r.stdout)


def wait_until(cond, within, step=0.05):
    end = time.monotonic() + within
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def check_trace(unit, bin_, config, tmp):
    """Runs the supervisor under strace with the unit's environment and a stand-in notification
    socket, drives it (requests, admin calls, SIGHUP, kill -9 of a worker, SIGTERM), and checks:
    the notifications Type=notify needs, a clean exit within the stop timeout, and that nothing
    the supervisor, its workers or MLX's kernel compiler did is refused by the unit's
    SystemCallFilter, MemoryDenyWriteExecute or RestrictAddressFamilies."""
    u = read_unit(unit)
    svc = lambda k: last(u, "Service", k)  # noqa: E731
    print(f"supervisor {bin_} under strace, as {unit} runs it, with {config}")
    http_port = free_port()
    sock = os.path.join(tmp, "admin.sock")
    notify = Notifications(os.path.join(tmp, "notify.sock"))
    jit = os.path.join(tmp, "tmp")
    os.makedirs(jit)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_SERVING_", "RUST_LOG", "NOTIFY_", "WATCHDOG_"))}
    for assignment in u.get("Service", {}).get("Environment", []):
        for pair in assignment.split():
            key, _, value = pair.strip('"').partition("=")
            if key != "LD_LIBRARY_PATH":  # the installed copy is not here; the build's RUNPATH is
                env[key] = value
    watchdog_s = 2.0  # shorter than the unit's, so the short run sees several ticks
    env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC=str(int(watchdog_s * 1e6)), TMPDIR=jit)
    trace = os.path.join(tmp, "strace.out")
    log = open(os.path.join(tmp, "supervisor.log"), "w")
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-s", "0", "-o", trace, bin_, "serve", "--config", config,
         "--listen", f"127.0.0.1:{http_port}", "--admin-listen", f"unix:{sock}"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    main_pid = None
    try:
        # Signals go to the supervisor, strace's child, as systemd sends them to the main process.
        # strace forks short-lived children of its own at start (ptrace feature probes): the
        # supervisor is the child running `serve`.
        def supervisor_pid():
            try:
                for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
                    if open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[1:2] == [b"serve"]:
                        return int(pid)
            except OSError:
                pass
            return None

        wait_until(lambda: proc.poll() is not None or supervisor_pid(), 10)
        main_pid = supervisor_pid()
        if main_pid is None:
            fail(f"the supervisor did not start (strace status {proc.poll()}); its log follows")
            return
        print(f"  supervisor pid {main_pid} (strace pid {proc.pid})")
        expect(notify.wait_for("READY=1", 30), "READY=1 sent once the workers were ready")
        status, _ = http(f"{base}/ready")
        expect(status == 200, f"/ready is 200 after READY=1 (got {status})")
        chat = {"model": admin(bin_, sock, "status")["models"][0], "max_tokens": 8,
                "messages": [{"role": "user", "content": "Hello"}]}
        for stream in (False, True):
            status, body = http(f"{base}/v1/chat/completions", dict(chat, stream=stream))
            expect(status == 200, f"a chat completion (stream={stream}) answered 200 (got {status})")
        compiled = [f for _, _, files in os.walk(jit) for f in files if f.endswith(".so")]
        print(f"  MLX kernels compiled in this run: {len(compiled)} (0 when g++ is missing: MLX then runs them unfused)")
        os.kill(main_pid, signal.SIGHUP)
        pids = [w["pid"] for w in admin(bin_, sock, "status")["workers"] if w["pid"]]
        os.kill(pids[0], signal.SIGKILL)
        expect(wait_until(lambda: sum(w["state"] == "ready" and w["pid"] not in pids
                                      for w in admin(bin_, sock, "status")["workers"]) == 1, 20),
               "a worker killed with SIGKILL was replaced")
        admin(bin_, sock, "rolling-restart")
        status, _ = http(f"{base}/v1/chat/completions", chat)
        expect(status == 200, f"a chat completion after a rolling restart answered 200 (got {status})")
        time.sleep(watchdog_s)  # at least one watchdog interval of plain running
        stop_limit = timespan_s(svc("TimeoutStopSec") or "90s")
        os.kill(main_pid, signal.SIGTERM)
        t = time.monotonic()
        try:
            rc = proc.wait(timeout=stop_limit)
        except subprocess.TimeoutExpired:
            rc = None
        expect(rc == 0, f"SIGTERM: exited with status {rc} after {time.monotonic() - t:.1f} s (TimeoutStopSec {stop_limit:g} s)")
        expect(bool(notify.times("STOPPING=1")), "STOPPING=1 sent on SIGTERM")
        ticks = notify.times("WATCHDOG=1")
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        expect(len(ticks) >= 2 and max(gaps) < watchdog_s,
               f"WATCHDOG=1 sent {len(ticks)} times, at most {max(gaps, default=0):.2f} s apart (WATCHDOG_USEC {watchdog_s:g} s)")
        statuses = [m for _, m in notify.messages if m.startswith("STATUS=")]
        expect(bool(statuses), f"STATUS= lines sent, the last: {statuses[-1] if statuses else None!r}")
    finally:
        if proc.poll() is None:
            if main_pid:
                try:
                    os.kill(main_pid, signal.SIGKILL)  # its workers exit when their stdin closes
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
        log.close()

    used, wx, families = set(), [], set()
    call = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>)")
    for line in open(trace, errors="replace"):
        m = call.match(line)
        if not m:
            continue
        name = m.group(1)
        used.add(name)
        if name in ("mmap", "mmap2") and "PROT_EXEC" in line and "PROT_WRITE" in line:
            wx.append(line.strip())
        elif name in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in line:
            wx.append(line.strip())
        elif name == "socket" and "(" in line:
            families.add(line.split("(", 1)[1].split(",", 1)[0])
    print(f"  traced {len(used)} distinct system calls")
    allowed = allowed_syscalls(u.get("Service", {}).get("SystemCallFilter", []))
    if allowed is not None:
        outside = sorted(used - allowed)
        expect(not outside, f"every system call is in SystemCallFilter ({svc('SystemCallFilter')}): outside: {outside}")
    if (svc("MemoryDenyWriteExecute") or "no") in ("yes", "true", "1", "on"):
        expect(not wx, f"MemoryDenyWriteExecute: no writable+executable mapping and no mprotect adding PROT_EXEC: {wx[:3]}")
    restrict = svc("RestrictAddressFamilies")
    if restrict and not restrict.startswith("~"):
        outside = sorted(families - set(restrict.split()))
        expect(not outside, f"sockets {sorted(families)} are in RestrictAddressFamilies ({restrict}): outside: {outside}")


def main():
    what, *args = sys.argv[1:]
    {"unit": check_unit, "plist": check_plist, "trace": check_trace}[what](*args)
    if FAILURES:
        sys.exit(1)


if __name__ == "__main__":
    main()
