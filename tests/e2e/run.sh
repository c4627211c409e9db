#!/bin/bash
# lockwarden end-to-end suite: real libvirtd 9.0 + real QEMU on two "hosts" (mount namespaces)
# sharing one image directory. See tests/e2e/README.md.
#
# usage: tests/e2e/run.sh [--plugin LIBLOCKWARDEN.so] [--daemon LOCKWARDEND]
#                         [--cli LOCKWARDEN] [--testfs TESTFS]
#                         [--baseline-lockd] [--only "N N ..."] [--keep]
#   --plugin/--daemon  what to test (default: target/debug/liblockwarden.so and lockwardend)
#   --cli/--testfs     the admin CLI and the FUSE lock server of scenario 17 (default:
#                      target/debug/lockwarden and target/debug/examples/testfs)
#   --baseline-lockd   run the scenarios with Debian's lockd + virtlockd on both hosts instead
#                      (validates the testbed itself; scenarios about lockwarden are skipped)
#   --only             run only these scenario numbers
#   --keep             keep the work directory (logs, XML) after the run
# Prints one line per scenario (PASS/FAIL/INFO/SKIP <n> <title>[: evidence]), lines starting
# with '#' for details, and a final "N passed, M failed". Exit status 1 if anything failed.
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$E2E_DIR/../.." && pwd)
LW_SO=$ROOT/target/debug/liblockwarden.so
LW_DAEMON=$ROOT/target/debug/lockwardend
LW_CLI_SRC=$ROOT/target/debug/lockwarden
LW_TESTFS_SRC=$ROOT/target/debug/examples/testfs
MODE=lockwarden
ONLY=''
KEEP=0
ORIG_ARGS=("$@")
while [ $# -gt 0 ]; do
  case $1 in
  --plugin) LW_SO=$2 && shift ;;
  --daemon) LW_DAEMON=$2 && shift ;;
  --cli) LW_CLI_SRC=$2 && shift ;;
  --testfs) LW_TESTFS_SRC=$2 && shift ;;
  --baseline-lockd) MODE=lockd ;;
  --only) ONLY=$2 && shift ;;
  --keep) KEEP=1 ;;
  -h | --help)
    sed -n '2,16p' "$0"
    exit 0
    ;;
  *)
    echo "e2e: unknown argument $1 (see --help)" >&2
    exit 2
    ;;
  esac
  shift
done

# --- prerequisites: fail loudly, naming the Debian package --------------------------------
missing=()
need_cmd() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (Debian package $2)"); }
need_cmd libvirtd "libvirt-daemon, pulled in by libvirt-daemon-system"
need_cmd virtlockd "libvirt-daemon, pulled in by libvirt-daemon-system"
need_cmd virsh libvirt-clients
need_cmd qemu-system-x86_64 qemu-system-x86
need_cmd qemu-img qemu-utils
need_cmd unshare util-linux
need_cmd nsenter util-linux
need_cmd timeout coreutils
need_cmd "${CC:-cc}" gcc
[ -e /usr/lib/x86_64-linux-gnu/libvirt/lock-driver/lockd.so ] ||
  missing+=("/usr/lib/x86_64-linux-gnu/libvirt/lock-driver/lockd.so (Debian package libvirt-daemon)")
[ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] ||
  missing+=("libvirt's QEMU driver (Debian package libvirt-daemon-driver-qemu)")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'e2e: missing prerequisite: %s\n' "${missing[@]}" >&2
  echo "e2e: install them with .ci/install-deps (apt-get, Debian 12)" >&2
  exit 1
fi
[ "$(id -u)" = 0 ] || {
  echo "e2e: must run as root (it starts system libvirtds in private mount namespaces)" >&2
  exit 1
}
if [ "$MODE" = lockwarden ]; then
  [ -f "$LW_SO" ] || {
    echo "e2e: plugin $LW_SO not found (run cargo build)" >&2
    exit 1
  }
  [ -x "$LW_DAEMON" ] || {
    echo "e2e: daemon $LW_DAEMON not found (run cargo build)" >&2
    exit 1
  }
  [ -x "$LW_CLI_SRC" ] || {
    echo "e2e: admin CLI $LW_CLI_SRC not found (run cargo build)" >&2
    exit 1
  }
  [ -x "$LW_TESTFS_SRC" ] || {
    echo "e2e: FUSE lock server $LW_TESTFS_SRC not found (run cargo build --example testfs)" >&2
    exit 1
  }
  [ -e /dev/fuse ] || {
    echo "e2e: /dev/fuse is missing (modprobe fuse): scenario 17 mounts a FUSE lock server" >&2
    exit 1
  }
fi

# --- run under a child subreaper (prompt reaping of QEMU; nothing outlives the suite) ------
if [ -z "${LW_E2E_REAPED:-}" ]; then
  W=$(mktemp -d /tmp/lw-e2e.XXXXXX) || exit 1
  mkdir -p "$W/bin"
  "${CC:-cc}" -O1 -Wall -Wextra -Werror -o "$W/bin/subreaper" "$E2E_DIR/subreaper.c" ||
    { echo "e2e: cannot compile tests/e2e/subreaper.c" >&2; rm -rf "$W"; exit 1; }
  LW_E2E_REAPED=1 LW_E2E_WORKDIR=$W exec "$W/bin/subreaper" bash "$0" "${ORIG_ARGS[@]}"
fi
W=$LW_E2E_WORKDIR
IMG=$W/images

# shellcheck source=lib/testbed.sh
source "$E2E_DIR/lib/testbed.sh"
# shellcheck source=lib/scenarios.sh
source "$E2E_DIR/lib/scenarios.sh"
# shellcheck source=lib/partition.sh
source "$E2E_DIR/lib/partition.sh"
T_START=$(now_ms)
if [ -n "${LW_E2E_TRACE:-}" ]; then # debugging aid: a timestamped trace on stderr
  exec 9>&2
  BASH_XTRACEFD=9 # not stderr: the trace must not end up in captured "$(virsh ... 2>&1)"
  PS4='+ $(date +%T.%3N) ${FUNCNAME[0]:-main}: '
  set -x
fi

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  testbed_teardown
  if [ "$KEEP" = 1 ] || { [ "$rc" -ne 0 ] && [ -n "${LW_E2E_KEEP_ON_FAILURE:-}" ]; }; then
    echo "# work directory kept: $W"
  else
    rm -rf "$W"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "e2e: interrupted, cleaning up" >&2; exit 130' INT TERM

mkdir -p "$IMG" "$W/xml" "$W/plugins"
cp "$E2E_DIR/qemu-nolock.sh" "$W/bin/qemu-nolock" && chmod 755 "$W/bin/qemu-nolock"
ln -s /usr/lib/x86_64-linux-gnu/libvirt/lock-driver/lockd.so "$W/plugins/lockd.so"
if [ "$MODE" = lockwarden ]; then
  # Copies, so a rebuild during the run cannot change what is being tested.
  cp "$LW_SO" "$W/plugins/lockwarden.so"
  cp "$LW_DAEMON" "$W/bin/lockwardend"
  cp "$LW_CLI_SRC" "$W/bin/lockwarden"
  cp "$LW_TESTFS_SRC" "$W/bin/testfs"
fi
LW_CLI=$W/bin/lockwarden
LW_TESTFS=$W/bin/testfs

echo "# e2e: mode $MODE, work dir $W, $(libvirtd --version | head -1), $(qemu-system-x86_64 --version | head -1)"
ensure_mountpoints
for h in "${HOSTS[@]}"; do
  t0=$(now_ms)
  host_up "$h" "$MODE" || die "host $h could not be brought up (lock_manager=$MODE); logs in $(hostdir "$h")/log"
  echo "# host $h up in $(since "$t0"): $(uri "$h")"
done

run_all_scenarios

echo "# suite time $(since "$T_START")"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
