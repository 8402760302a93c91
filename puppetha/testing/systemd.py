"""
A stand-in for ``systemctl`` on machines without systemd (these test machines), for the
deployment guide's test: ``python -m puppetha.testing.systemd start puppetha``.

It starts units the way systemd would for the directives our guide's units use, read from the
same files systemd reads (``/etc/systemd/system`` first, then ``/lib/systemd/system``, with
drop-ins from ``NAME.service.d/*.conf``): ``ConditionPathExists``, ``Type`` (simple, exec,
forking with ``PIDFile``), ``User``, ``Group``, ``UMask``, ``Environment``, ``EnvironmentFile``,
``RuntimeDirectory``/``StateDirectory`` (and their modes), ``ExecStartPre``, ``ExecStart``,
``ExecStartPost``, with ``$VAR``/``${VAR}`` expansion and ``%%``.  The working directory is
``/``, as systemd's.  The sandboxing our unit uses is applied too, in a mount namespace of the
service's own (:data:`SANDBOX`): ``ProtectSystem=strict`` (every mount read-only but ``/dev``,
``/proc``, ``/sys``, the runtime and state directories and ``ReadWritePaths``, a missing one of
which fails the start as in systemd unless prefixed ``-``), ``PrivateTmp``, ``ProtectHome`` and
``NoNewPrivileges``; so a unit that forgets a path it writes fails here as on a real host.
Other sandboxing directives are not applied.  A service's output goes to
``/var/log/puppetha-test-systemd/NAME.log`` (journald's place).  ``AWS_*`` variables of
the caller reach the services: they stand in for an instance profile's credentials.

Only for tests: it is not a service manager (no restarts, no dependencies).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))
STATE = Path("/run/puppetha-test-systemd")
LOGS = Path("/var/log/puppetha-test-systemd")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


#: Run as root in a new mount namespace (``unshare --mount``): ``$1`` the newline-separated
#: writable paths, ``$2`` whether /tmp and the homes are private, then the command (which drops
#: to the service's user through ``setpriv``).
SANDBOX = r"""
set -e
writable=$1 private=$2
shift 2
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
    case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
    mount -o remount,bind,ro "$m" 2>/dev/null || true
done
if [ "$private" = yes ]; then
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    for home in /home /root /run/user; do
        if [ -d "$home" ]; then mount -t tmpfs -o ro,mode=0 tmpfs "$home"; fi
    done
fi
printf '%s\n' "$writable" | while read -r path; do
    optional=no
    case "$path" in -*) optional=yes; path=${path#-} ;; esac
    [ -n "$path" ] || continue
    if [ ! -e "$path" ]; then
        [ "$optional" = yes ] && continue
        echo "ReadWritePaths: $path does not exist (status=226/NAMESPACE)" >&2
        exit 226
    fi
    mount --bind "$path" "$path"
    mount -o remount,bind,rw "$path"
done
exec "$@"
"""


class UnitError(Exception):
    pass


Directives = dict[str, list[str]]


def _unit_name(name: str) -> str:
    return name if "." in name else f"{name}.service"


def _parse(text: str, into: dict[str, Directives]) -> None:
    section = ""
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        while line.endswith("\\"):
            following = next(lines, "")
            if following.lstrip().startswith(("#", ";")):
                continue
            line = line[:-1] + " " + following.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            into.setdefault(section, {})
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UnitError(f"not a directive: {line!r}")
        values = into.setdefault(section, {}).setdefault(key.strip(), [])
        if value.strip() == "":
            values.clear()  # an empty assignment resets the list, as in systemd
        else:
            values.append(value.strip())


def load_unit(name: str) -> dict[str, Directives]:
    unit = _unit_name(name)
    found = next((d / unit for d in UNIT_DIRS if (d / unit).is_file()), None)
    if found is None:
        raise UnitError(f"Unit {unit} not found.")
    sections: dict[str, Directives] = {}
    _parse(found.read_text(), sections)
    for directory in UNIT_DIRS:
        for dropin in sorted((directory / f"{unit}.d").glob("*.conf")):
            _parse(dropin.read_text(), sections)
    return sections


def _last(directives: Directives, key: str, default: str = "") -> str:
    values = directives.get(key)
    return values[-1] if values else default


def _expand_word(word: str, env: Mapping[str, str]) -> list[str]:
    whole = re.fullmatch(r"\$(\w+)", word)
    if whole:
        return env.get(whole.group(1), "").split()
    word = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word)
    word = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), word)
    return [word.replace("%%", "%")]


def command_line(line: str, env: Mapping[str, str]) -> tuple[list[str], bool]:
    """An Exec line as argv, and whether a failure is ignored (the ``-`` prefix)."""
    ignore = False
    while line and line[0] in "-@+!:":
        ignore = ignore or line[0] == "-"
        line = line[1:]
    argv: list[str] = []
    for word in shlex.split(line):
        argv += _expand_word(word, env)
    return argv, ignore


def _environment_file(line: str) -> dict[str, str]:
    optional = line.startswith("-")
    path = Path(line.lstrip("-"))
    if not path.exists():
        if optional:
            return {}
        raise UnitError(f"EnvironmentFile {path} is missing")
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        text = raw.strip()
        if not text or text.startswith(("#", ";")) or "=" not in text:
            continue
        key, _, value = text.partition("=")
        words = shlex.split(value) if value.strip() else [""]
        found[key.strip()] = " ".join(words)
    return found


class Service:
    def __init__(self, name: str, caller_env: Mapping[str, str]) -> None:
        self.name = name.removesuffix(".service")
        sections = load_unit(name)
        self.unit = sections.get("Unit", {})
        self.service = sections.get("Service", {})
        self.user = _last(self.service, "User", "root")
        account = pwd.getpwnam(self.user)
        self.group = _last(self.service, "Group") or grp.getgrgid(account.pw_gid).gr_name
        self.extra_groups = [g.gr_gid for g in grp.getgrall() if self.user in g.gr_mem]
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": account.pw_dir, "USER": self.user,
               "LOGNAME": self.user}
        env.update({k: v for k, v in caller_env.items() if k.startswith("AWS_")})
        for line in self.service.get("EnvironmentFile", []):
            env.update(_environment_file(line))
        for line in self.service.get("Environment", []):
            for word in shlex.split(line):
                key, _, value = word.partition("=")
                env[key] = value
        self.env = env
        self.umask = int(_last(self.service, "UMask", "0022"), 8)
        self.sandboxed = _last(self.service, "ProtectSystem") == "strict"
        self.pid_path = STATE / f"{self.name}.pid"
        self.log_path = LOGS / f"{self.name}.log"

    def _directories(self, kind: str, base: str, variable: str) -> None:
        mode = int(_last(self.service, f"{kind}Mode", "0755"), 8)
        names = [n for line in self.service.get(kind, []) for n in line.split()]
        for name in names:
            path = Path(base) / name
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, pwd.getpwnam(self.user).pw_uid, grp.getgrnam(self.group).gr_gid)
            path.chmod(mode)
        if names:
            self.env[variable] = ":".join(str(Path(base) / n) for n in names)

    def writable_paths(self) -> list[str]:
        """What ``ProtectSystem=strict`` leaves writable: the unit's directories, ``ReadWritePaths``."""
        paths = [f"/run/{n}" for line in self.service.get("RuntimeDirectory", []) for n in line.split()]
        paths += [f"/var/lib/{n}" for line in self.service.get("StateDirectory", []) for n in line.split()]
        paths += [p for line in self.service.get("ReadWritePaths", []) for p in line.split()]
        return paths

    def _sandboxed(self, argv: Sequence[str]) -> list[str]:
        private = any(_last(self.service, key) == "true" for key in ("PrivateTmp", "ProtectHome"))
        groups = ",".join(str(g) for g in self.extra_groups)
        drop = ["setpriv", f"--reuid={pwd.getpwnam(self.user).pw_uid}",
                f"--regid={grp.getgrnam(self.group).gr_gid}",
                f"--groups={groups}" if groups else "--clear-groups"]
        if _last(self.service, "NoNewPrivileges") == "true":
            drop.append("--no-new-privs")
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", SANDBOX, "sandbox",
                "\n".join(self.writable_paths()), "yes" if private else "no", *drop, "--", *argv]

    def _popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        if self.sandboxed:
            # Root sets the namespace up; setpriv then becomes the service's user.
            return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
                self._sandboxed(argv), cwd="/", env=self.env, umask=self.umask,
                stdin=subprocess.DEVNULL, **kwargs,
            )
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            list(argv), cwd="/", env=self.env, user=self.user, group=self.group,
            extra_groups=self.extra_groups, umask=self.umask, stdin=subprocess.DEVNULL, **kwargs,
        )

    def _run_each(self, key: str) -> None:
        for line in self.service.get(key, []):
            argv, ignore = command_line(line, self.env)
            with self.log_path.open("ab") as log:
                done = self._popen(argv, stdout=log, stderr=subprocess.STDOUT).wait(timeout=600)
            if done != 0 and not ignore:
                raise UnitError(f"{self.name}: {key} {argv[0]} exited {done}; see {self.log_path}:\n"
                                f"{self.log_tail()}")

    def main_pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no output)"

    def start(self) -> None:
        if self.main_pid() is not None:
            return
        for condition in self.unit.get("ConditionPathExists", []):
            negate = condition.startswith("!")
            if os.path.exists(condition.lstrip("!")) == negate:
                print(f"Condition check resulted in {self.name}.service being skipped "
                      f"(ConditionPathExists={condition}).", file=sys.stderr)
                return
        STATE.mkdir(parents=True, exist_ok=True)
        LOGS.mkdir(parents=True, exist_ok=True)
        self._directories("RuntimeDirectory", "/run", "RUNTIME_DIRECTORY")
        self._directories("StateDirectory", "/var/lib", "STATE_DIRECTORY")
        self._run_each("ExecStartPre")
        kind = _last(self.service, "Type", "simple")
        (line,) = self.service.get("ExecStart", [])[-1:] or [""]
        argv, _ = command_line(line, self.env)
        if not argv:
            raise UnitError(f"{self.name}: no ExecStart")
        with self.log_path.open("ab") as log:
            process = self._popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if kind == "forking":
            if process.wait(timeout=120) != 0:
                raise UnitError(f"{self.name}: {argv[0]} exited {process.returncode}:\n{self.log_tail()}")
            pid_file = _last(self.service, "PIDFile")
            pid = int(Path(pid_file).read_text().split()[0]) if pid_file else process.pid
        else:
            pid = process.pid
            time.sleep(1)  # what dies at once (a bad config) is reported here, not later
            if process.poll() is not None:
                raise UnitError(f"{self.name}: {argv[0]} exited {process.returncode}:\n{self.log_tail()}")
        self.pid_path.write_text(str(pid))
        self.env["MAINPID"] = str(pid)
        self._run_each("ExecStartPost")

    def stop(self) -> None:
        pid = self.main_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
        self.pid_path.unlink(missing_ok=True)


def main(argv: Sequence[str]) -> int:
    args = [a for a in argv if not a.startswith("-")]
    now = "--now" in argv
    if not args:
        print("usage: systemctl enable [--now]|start|stop|restart|is-active|daemon-reload UNIT...",
              file=sys.stderr)
        return 2
    verb, units = args[0], args[1:]
    try:
        if verb == "daemon-reload":
            return 0
        for unit in units:
            service = Service(unit, os.environ)
            if verb == "enable":
                STATE.mkdir(parents=True, exist_ok=True)
                (STATE / f"{service.name}.enabled").touch()
                if now:
                    service.start()
            elif verb == "start":
                service.start()
            elif verb == "stop":
                service.stop()
            elif verb == "restart":
                service.stop()
                service.start()
            elif verb == "is-active":
                if service.main_pid() is None:
                    print("inactive")
                    return 3
                print("active")
            else:
                print(f"systemctl (test stand-in): {verb} is not supported", file=sys.stderr)
                return 2
    except UnitError as e:
        print(f"systemctl (test stand-in): {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
