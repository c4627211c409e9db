#!/usr/bin/env bash
# Packaging check: what a distribution package of lockwarden would contain, verified.
#
#   bash scripts/check-install.sh [--keep]
#
# 1. meson setup (distribution layout: --prefix=/usr --sysconfdir=/etc), meson compile,
#    meson test (augeas lens tests, man page lint, plugin symbol check), and
#    meson install --destdir into a scratch directory;
# 2. the installed tree must be exactly the expected files, at the expected paths, with the
#    expected modes;
# 3. systemd-analyze verify must accept the units and the libvirtd/virtqemud drop-ins without a
#    single message;
# 4. augparse runs the installed lens tests against the installed lenses; man -l renders every
#    installed page without a warning;
# 5. the installed lockwardend starts with every setting its shipped config file documents
#    (uncommented), reports READY=1 to NOTIFY_SOCKET as Type=notify needs, and serves sockets
#    passed by socket activation under the unit files' FileDescriptorName names.
# Prints one PASS/FAIL line per check and "N passed, M failed"; exit status 1 on any failure.
# Missing tools (augparse: augeas-tools; systemd-analyze: systemd; man: man-db) are failures.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEEP=0
[ "${1:-}" = --keep ] && KEEP=1
W=$(mktemp -d /tmp/lockwarden-check-install.XXXXXX)
BUILD=$W/build
DEST=$W/dest
PASSED=0
FAILED=0
DAEMON_PID=''

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -KILL "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
  fi
  if [ "$KEEP" = 1 ]; then echo "# kept $W"; else rm -rf "$W"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() {
  echo "PASS $1"
  PASSED=$((PASSED + 1))
}
fail() {
  echo "FAIL $1"
  shift
  [ $# -gt 0 ] && printf '%s\n' "$@" | sed 's/^/#   /'
  FAILED=$((FAILED + 1))
}
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  fail "$3" "$1 not found (Debian package $2)"
  return 1
}

# ---------------------------------------------------------------------------------------- 1
if ! meson setup "$BUILD" "$ROOT/meson-install" --prefix=/usr --sysconfdir=/etc \
  >"$W/setup.log" 2>&1; then
  fail "meson setup" "$(tail -20 "$W/setup.log")"
  echo "$PASSED passed, $FAILED failed"
  exit 1
fi
pass "meson setup"
if ! meson compile -C "$BUILD" >"$W/compile.log" 2>&1; then
  fail "meson compile" "$(tail -30 "$W/compile.log")"
  echo "$PASSED passed, $FAILED failed"
  exit 1
fi
pass "meson compile"
if meson test -C "$BUILD" --print-errorlogs >"$W/test.log" 2>&1; then
  pass "meson test ($(grep -c '^ *[0-9]*/[0-9]* .* OK' "$W/test.log") tests)"
else
  fail "meson test" "$(grep -E 'FAIL|ERROR|Ok:|Fail:' "$W/test.log" | head -20)"
fi
if ! DESTDIR=$DEST meson install -C "$BUILD" --quiet >"$W/install.log" 2>&1; then
  fail "meson install --destdir" "$(tail -20 "$W/install.log")"
  echo "$PASSED passed, $FAILED failed"
  exit 1
fi
pass "meson install --destdir"

# ---------------------------------------------------------------------------------------- 2
libdir=$(meson introspect --buildoptions "$BUILD" |
  python3 -c 'import json,sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "libdir"))')
expected=$(
  sort <<EOF
755 usr/bin/lockwarden
755 usr/sbin/lockwardend
644 usr/$libdir/libvirt/lock-driver/lockwarden.so
644 etc/libvirt/qemu-lockwarden.conf
644 etc/libvirt/libxl-lockwarden.conf
644 etc/libvirt/lockwardend.conf
644 usr/lib/systemd/system/lockwardend.service
644 usr/lib/systemd/system/lockwardend.socket
644 usr/lib/systemd/system/lockwardend-admin.socket
644 usr/lib/systemd/system/lockwarden-metrics.service
644 usr/lib/systemd/system/lockwarden-metrics.timer
644 usr/lib/systemd/system/libvirtd.service.d/lockwarden.conf
644 usr/lib/systemd/system/virtqemud.service.d/lockwarden.conf
644 usr/share/man/man1/lockwarden.1
644 usr/share/man/man5/qemu-lockwarden.conf.5
644 usr/share/man/man7/lockwarden-protocol.7
644 usr/share/man/man8/lockwardend.8
644 usr/share/augeas/lenses/libvirt_lockwarden.aug
644 usr/share/augeas/lenses/libvirt_lockwardend.aug
644 usr/share/augeas/lenses/tests/test_libvirt_lockwarden.aug
644 usr/share/augeas/lenses/tests/test_libvirt_lockwardend.aug
EOF
)
actual=$(cd "$DEST" && find . \( -type f -o -type l \) -printf '%m %P\n' | sort)
if [ "$expected" = "$actual" ]; then
  pass "installed tree is exactly the $(wc -l <<<"$expected") expected files"
else
  fail "installed tree" "$(diff <(echo "$expected") <(echo "$actual") | grep '^[<>]' |
    sed 's/^</missing:/; s/^>/unexpected:/')"
fi
echo "# installed tree (DESTDIR=$DEST):"
(cd "$DEST" && find . -type f -printf '%m %P\n' | sort | sed 's/^/#   /')

so=$DEST/usr/$libdir/libvirt/lock-driver/lockwarden.so
if [ "$(head -c 4 "$so" | od -An -c | tr -d ' ')" = '177ELF' ]; then
  pass "lockwarden.so is an ELF file"
else
  fail "lockwarden.so is an ELF file" "$(head -c 16 "$so" | od -An -c)"
fi

# The panic test hook exists only in debug builds: the installed (release) plugin must ignore
# LOCKWARDEN_TEST_PANIC, so drvInit succeeds with it set (a debug build returns -1 here).
hook_py='import ctypes, sys
so = ctypes.CDLL(sys.argv[1])
INIT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.c_uint)
class Drv(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("flags", ctypes.c_uint), ("drvInit", INIT)]
print(Drv.in_dll(so, "virLockDriverImpl").drvInit(1000000, b"/nonexistent/qemu-lockwarden.conf", 0))'
if need python3 python3 "the installed plugin has no panic test hook"; then
  out=$(LOCKWARDEN_TEST_PANIC=init python3 -c "$hook_py" "$so" 2>&1)
  if [ "$(printf '%s\n' "$out" | tail -1)" = 0 ]; then
    pass "installed lockwarden.so ignores LOCKWARDEN_TEST_PANIC (drvInit returns 0)"
  else
    fail "installed lockwarden.so ignores LOCKWARDEN_TEST_PANIC (drvInit returns 0)" "$out"
  fi
fi

# ---------------------------------------------------------------------------------------- 3
if need systemd-analyze systemd "systemd-analyze verify"; then
  units=$W/units
  mkdir -p "$units"
  cp -r "$DEST/usr/lib/systemd/system/." "$units/"
  # Point ExecStart at the staged binary (verify checks that it is executable).
  sed -i "s|^ExecStart=/usr/sbin/lockwardend|ExecStart=$DEST/usr/sbin/lockwardend|" "$units/lockwardend.service"
  sed -i "s|^ExecStart=/usr/bin/lockwarden|ExecStart=$DEST/usr/bin/lockwarden|" "$units/lockwarden-metrics.service"
  # Debian 12 has no virtqemud.service; a stub lets the drop-in be loaded and checked.
  for svc in libvirtd virtqemud; do
    if [ ! -e "/lib/systemd/system/$svc.service" ] && [ ! -e "/usr/lib/systemd/system/$svc.service" ] &&
      [ ! -e "/etc/systemd/system/$svc.service" ]; then
      printf '[Unit]\nDescription=stand-in for %s\n[Service]\nExecStart=/bin/true\n' "$svc" >"$units/$svc.service"
    fi
  done
  out=$(cd "$W" && SYSTEMD_UNIT_PATH=$units: systemd-analyze verify --man=no \
    lockwardend.service lockwardend.socket lockwardend-admin.socket \
    lockwarden-metrics.service lockwarden-metrics.timer \
    libvirtd.service virtqemud.service 2>&1)
  rc=$?
  # Only messages about our files count; Debian's own libvirtd.service is not ours to judge.
  ours=$(printf '%s\n' "$out" | grep -E 'lockwarden' || true)
  if [ "$rc" -eq 0 ] && [ -z "$ours" ]; then
    pass "systemd-analyze verify (lockwardend.service, .socket, -admin.socket, lockwarden-metrics.service, .timer, both drop-ins)"
  else
    fail "systemd-analyze verify (exit $rc)" "$out"
  fi
  # shellcheck disable=SC2016 # $MAINPID is literal unit-file text
  # The installed unit's effective [Service] settings, last assignment wins as in systemd
  # (a later line or a drop-in-style repeat overrides an earlier one); comments do not count.
  unit=$DEST/usr/lib/systemd/system/lockwardend.service
  setting() {
    awk -v k="$1" '/^\[/ { sec = $0 } sec == "[Service]" && index($0, k "=") == 1 {
      v = substr($0, length(k) + 2) } END { print v }' "$unit"
  }
  for kv in 'Type=notify' 'ExecReload=/bin/kill -USR1 $MAINPID' 'OOMScoreAdjust=-900' \
    'KillMode=process' 'Restart=on-failure'; do
    k=${kv%%=*} want=${kv#*=}
    got=$(setting "$k")
    if [ "$got" = "$want" ]; then
      pass "installed lockwardend.service: $k=$want"
    else
      fail "installed lockwardend.service: $k=$want" "it says ${k}=${got:-<unset>}"
    fi
  done
  case $(setting ExecStart) in
    /usr/sbin/lockwardend*) pass "installed lockwardend.service: ExecStart=/usr/sbin/lockwardend" ;;
    *) fail "installed lockwardend.service: ExecStart=/usr/sbin/lockwardend" "$(setting ExecStart)" ;;
  esac
fi

# ---------------------------------------------------------------------------------------- 4
if need augparse augeas-tools "augparse on the installed lens tests"; then
  for t in "$DEST"/usr/share/augeas/lenses/tests/test_*.aug; do
    if out=$(augparse -I "$DEST/usr/share/augeas/lenses" "$t" 2>&1); then
      pass "augparse $(basename "$t")"
    else
      fail "augparse $(basename "$t")" "$out"
    fi
  done
fi
if need man man-db "man -l on the installed pages"; then
  for p in "$DEST"/usr/share/man/man*/*; do
    if out=$(sh "$ROOT/meson-install/man/check-man.sh" "$p" 2>&1); then
      pass "man -l $(basename "$p") renders without warnings"
    else
      fail "man -l $(basename "$p")" "$out"
    fi
  done
fi

# ---------------------------------------------------------------------------------------- 5
daemon=$DEST/usr/sbin/lockwardend
# Every documented setting, uncommented, with its documented default.
conf=$W/lockwardend-all-keys.conf
sed -n 's/^#\([a-z_][a-z_]*\) = /\1 = /p' "$DEST/etc/libvirt/lockwardend.conf" >"$conf"
# watchdog_device: this machine has no watchdog to spare (and a test must never arm a real
# one), so the documented example path is replaced by a FIFO with a reader, the stand-in
# lockwardend accepts (docs/storage.md, "Watchdog"). This shell holds the reader end open for
# both daemons started below.
mkfifo "$W/watchdog.fifo"
exec 9<>"$W/watchdog.fifo"
sed -i "s|^watchdog_device = .*|watchdog_device = \"$W/watchdog.fifo\"|" "$conf"
grep -q '^watchdog_device = ' "$conf" || fail "lockwardend.conf documents watchdog_device" "not in $conf"
# A datagram socket that records what the daemon sends to NOTIFY_SOCKET.
notify_listen() {
  python3 - "$1" "$2" <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.settimeout(15)
with open(sys.argv[2], "w") as out:
    try:
        while True:
            msg = s.recv(4096).decode(errors="replace")
            out.write(msg + "\n")
            out.flush()
            if "READY=1" in msg.split("\n"):
                break
    except socket.timeout:
        pass
EOF
}
# probe SOCKET REQUEST_JSON RESULT: send one request (lockwarden-protocol(7)) and fail unless
# the response's "result" is RESULT. Prints the response.
probe() {
  python3 - "$@" <<'EOF'
import json, socket, struct, sys
path, request, want = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
body = request.encode()
s.sendall(b"LKWD" + struct.pack(">HHI", 1, 0, len(body)) + body)
def read(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            sys.exit("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf
magic, version, _, length = struct.unpack(">4sHHI", read(12))
reply = json.loads(read(length))
print(json.dumps(reply))
sys.exit(0 if magic == b"LKWD" and reply.get("result") == want else 1)
EOF
}
STATUS='{"op":"status"}'
# A lock-side request: answered on the main socket, refused on the admin socket.
INQUIRE='{"op":"inquire","owner":{"uuid":"00000000-0000-0000-0000-000000000001","name":"check-install","id":1,"pid":1}}'
wait_for() { # wait_for SECONDS CMD...
  local i
  for ((i = 0; i < $1 * 20; i++)); do
    "${@:2}" && return 0
    sleep 0.05
  done
  return 1
}
stop_daemon() {
  [ -n "$DAEMON_PID" ] || return 0
  kill -TERM "$DAEMON_PID" 2>/dev/null
  wait_for 5 eval "! kill -0 $DAEMON_PID 2>/dev/null" || kill -KILL "$DAEMON_PID" 2>/dev/null
  wait "$DAEMON_PID" 2>/dev/null
  DAEMON_PID=''
}

# 5a: started by hand with the full config, sockets and pid file given on the command line.
s=$W/run-a
mkdir -p "$s"
notify_listen "$s/notify" "$s/notify.out"
notify_pid=$!
wait_for 5 test -S "$s/notify"
NOTIFY_SOCKET=$s/notify "$daemon" --config "$conf" --socket "$s/lw.sock" \
  --admin-socket "$s/lw-admin.sock" --pid-file "$s/lw.pid" </dev/null >"$s/log" 2>&1 &
DAEMON_PID=$!
if wait_for 10 test -S "$s/lw.sock" && kill -0 "$DAEMON_PID" 2>/dev/null; then
  pass "installed lockwardend starts with every documented setting of lockwardend.conf"
  if [ -S "$s/lw-admin.sock" ]; then
    pass "lockwardend creates the admin socket"
  else
    fail "lockwardend creates the admin socket" "no socket at $s/lw-admin.sock"
  fi
  if [ "$(cat "$s/lw.pid" 2>/dev/null)" = "$DAEMON_PID" ]; then
    pass "lockwardend writes its pid file"
  else
    fail "lockwardend writes its pid file" "$s/lw.pid: $(cat "$s/lw.pid" 2>&1)"
  fi
  mode=$(stat -c %a "$s/lw.sock")
  if [ "$mode" = 600 ]; then
    pass "main socket mode 0600"
  else
    fail "main socket mode 0600" "mode is $mode"
  fi
  if out=$(probe "$s/lw-admin.sock" "$STATUS" status 2>&1); then
    pass "lockwardend answers status on the admin socket"
  else
    fail "lockwardend answers status on the admin socket" "$out"
  fi
  if wait_for 10 grep -qx 'READY=1' "$s/notify.out"; then
    pass "lockwardend sends READY=1 to NOTIFY_SOCKET (Type=notify)"
  else
    fail "lockwardend sends READY=1 to NOTIFY_SOCKET (Type=notify)" "received: $(cat "$s/notify.out" 2>/dev/null)"
  fi
else
  fail "installed lockwardend starts with every documented setting of lockwardend.conf" \
    "config: $(tr '\n' ';' <"$conf")" "$(tail -10 "$s/log")"
fi
stop_daemon
kill "$notify_pid" 2>/dev/null
wait "$notify_pid" 2>/dev/null

# 5b: socket activation as lockwardend.socket + lockwardend-admin.socket do it.
if need systemd-socket-activate systemd "socket activation with the units' descriptor names"; then
  s=$W/run-b
  mkdir -p "$s"
  main_name=$(sed -n 's/^FileDescriptorName=//p' "$DEST/usr/lib/systemd/system/lockwardend.socket")
  admin_name=$(sed -n 's/^FileDescriptorName=//p' "$DEST/usr/lib/systemd/system/lockwardend-admin.socket")
  # The daemon is told other paths than the ones activation passes: it must use the passed ones.
  # The admin socket is passed first, so only the names (not the order) tell the two apart.
  systemd-socket-activate -l "$s/act-admin.sock" -l "$s/act.sock" \
    --fdname="$admin_name:$main_name" \
    "$daemon" --config "$conf" --socket "$s/not-used.sock" \
    --admin-socket "$s/not-used-admin.sock" --pid-file "$s/lw.pid" </dev/null >"$s/log" 2>&1 &
  DAEMON_PID=$!
  wait_for 5 test -S "$s/act.sock"
  # systemd-socket-activate execs the daemon on the first connection.
  what="lockwardend serves the sockets passed by socket activation ($main_name, $admin_name)"
  if ! out=$(probe "$s/act-admin.sock" "$STATUS" status 2>&1); then
    fail "$what" "status on the admin socket: $out" "$(tail -10 "$s/log")"
  elif ! out=$(probe "$s/act.sock" "$INQUIRE" ok 2>&1); then
    fail "$what" "inquire on the main socket: $out" "$(tail -10 "$s/log")"
  elif out=$(probe "$s/act-admin.sock" "$INQUIRE" ok 2>&1); then
    fail "$what" "the admin socket accepted a lock request: the descriptors were swapped" "$out"
  elif [ -e "$s/not-used.sock" ] || [ -e "$s/not-used-admin.sock" ]; then
    fail "$what" "it bound its own sockets: $(ls "$s")"
  else
    pass "$what"
  fi
  stop_daemon
fi

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
