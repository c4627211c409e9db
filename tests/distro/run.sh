#!/usr/bin/env bash
# Distribution end-to-end suite (issue 14): the real .deb, installed with apt into booted Debian
# containers (systemd as PID 1, the suite's own libvirt and QEMU), driven with systemctl.
#
#   bash tests/distro/run.sh [bookworm|trixie ...] [--deb PATH] [--keep]
#
# Per suite (default: bookworm and trixie):
#  1. a root file system from debootstrap, cached in $LOCKWARDEN_DISTRO_CACHE/<suite>
#     (default /var/cache/lockwarden-distro; delete the directory to rebuild it);
#  2. two containers, hosts A and B (systemd-nspawn -b, distinct -M and --hostname), each on an
#     overlay of the cached root, sharing one image directory at /var/lib/libvirt/images;
#  3. apt-get install of the .deb in both (target/debian/lockwarden_*_amd64.deb, built by
#     scripts/build-deb.sh when missing), qemu.conf: lock_manager = "lockwarden" plus the two
#     settings the container forces (cgroup_controllers = [ ], namespaces = [ ]);
#  4. checks, each printed as PASS/FAIL/INFO, and a lifecycle table: with a VM running on A,
#     each action runs while a sampler on this machine reads /proc/locks every 5 ms, matching
#     the disk's inode and lockwarden's lock on byte 0: samples taken, samples without the lock
#     (must be 0), whether `lockwarden list` on A shows the VM afterwards, whether host B is
#     refused (with QEMU's own image locking on, as shipped, and with it off, so that only
#     lockwarden can refuse).
# Exit status 1 if any check failed; 2 on a usage error. Needs root, debootstrap,
# systemd-container (systemd-nspawn), util-linux (nsenter, mount), python3, dpkg-dev.
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export LC_ALL=C.UTF-8

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${LOCKWARDEN_DISTRO_CACHE:-/var/cache/lockwarden-distro}
MIRROR=${LOCKWARDEN_DISTRO_MIRROR:-}
DEB=''
KEEP=0
SUITES=()
while [ $# -gt 0 ]; do
  case $1 in
  bookworm | trixie) SUITES+=("$1") ;;
  --deb)
    DEB=${2:?--deb needs a path}
    shift
    ;;
  --keep) KEEP=1 ;;
  -h | --help)
    sed -n '2,25p' "$0"
    exit 0
    ;;
  *)
    echo "distro: unknown argument $1 (see --help)" >&2
    exit 2
    ;;
  esac
  shift
done
[ ${#SUITES[@]} -gt 0 ] || SUITES=(bookworm trixie)

PASSED=0
FAILED=0
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
info() { echo "INFO $*"; }
note() { echo "# $*"; }
die() {
  echo "FAIL distro: $*"
  echo "$PASSED passed, $((FAILED + 1)) failed"
  exit 1
}

# ------------------------------------------------------------------------- prerequisites
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, systemd-nspawn, overlay mounts)"
missing=()
for c in debootstrap:debootstrap systemd-nspawn:systemd-container nsenter:util-linux \
  python3:python3 dpkg-deb:dpkg mount:mount promtool:prometheus; do
  command -v "${c%%:*}" >/dev/null 2>&1 || missing+=("${c%%:*} (Debian package ${c#*:})")
done
[ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]}; run .ci/install-deps as root"
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null
grep -qw overlay /proc/filesystems || die "the kernel has no overlay file system (modprobe overlay)"
if [ -z "$MIRROR" ]; then
  # The Debian mirror apt already uses on this machine.
  MIRROR=$(grep -rhoE '(https?://[^ ]*/debian)/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
    grep -v security | head -1 | tr -d ' ')
  MIRROR=${MIRROR%/}
  [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
fi

if [ -z "$DEB" ]; then
  DEB=$(ls -t "$ROOT"/target/debian/lockwarden_*_amd64.deb 2>/dev/null | head -1)
  if [ -z "$DEB" ]; then
    note "no target/debian/lockwarden_*_amd64.deb: building it (bash scripts/build-deb.sh)"
    bash "$ROOT/scripts/build-deb.sh" --no-lintian >/tmp/lockwarden-distro-build-deb.log 2>&1 ||
      { tail -30 /tmp/lockwarden-distro-build-deb.log; die "scripts/build-deb.sh failed"; }
    DEB=$(ls -t "$ROOT"/target/debian/lockwarden_*_amd64.deb | head -1)
  fi
fi
[ -f "$DEB" ] || die "no .deb at $DEB"
DEB_VERSION=$(dpkg-deb -f "$DEB" Version)
note "package: $DEB (version $DEB_VERSION)"

W=$(mktemp -d /var/tmp/lockwarden-distro.XXXXXX)
NSPAWN_PIDS=()
MOUNTS=()
cleanup() {
  local rc=$? p i
  trap - EXIT INT TERM
  for p in "${NSPAWN_PIDS[@]}"; do
    poweroff_container "$p"
  done
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null
  done
  if [ "$KEEP" = 1 ]; then note "kept $W"; else rm -rf "$W"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A newer version of the same package: the same files, Version bumped (the upgrade test).
BUMPED=$W/lockwarden_${DEB_VERSION}+distrotest1_amd64.deb
dpkg-deb -R "$DEB" "$W/bump" || die "dpkg-deb -R $DEB failed"
sed -i "s/^Version: .*/Version: ${DEB_VERSION}+distrotest1/" "$W/bump/DEBIAN/control"
dpkg-deb --root-owner-group -b "$W/bump" "$BUMPED" >/dev/null || die "dpkg-deb -b failed"
rm -rf "$W/bump"

# ------------------------------------------------------------------------- root file system
INCLUDE=systemd,systemd-sysv,dbus,libpam-systemd,libvirt-daemon-system,libvirt-daemon-driver-qemu,libvirt-clients,qemu-system-x86,qemu-utils,iproute2,procps
rootfs() { # rootfs SUITE: prints the cached root directory, building it when missing
  local suite=$1 dir=$CACHE/$1
  if [ -f "$dir/ok" ] && [ "$(cat "$dir/ok")" = "$INCLUDE" ] && [ -x "$dir/root/usr/sbin/libvirtd" ]; then
    echo "$dir/root"
    return 0
  fi
  note "building the $suite root file system in $dir (debootstrap from $MIRROR, about a minute)" >&2
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  if ! debootstrap --variant=minbase --include="$INCLUDE" "$suite" "$dir.tmp/root" "$MIRROR" \
    >"$dir.tmp/debootstrap.log" 2>&1; then
    tail -20 "$dir.tmp/debootstrap.log" >&2
    echo "debootstrap of $suite failed (log: $dir.tmp/debootstrap.log)" >&2
    return 1
  fi
  # Mend anything debootstrap left unconfigured, and fetch the package lists, so that apt in
  # the container resolves the .deb's dependencies.
  mount -t proc proc "$dir.tmp/root/proc"
  chroot "$dir.tmp/root" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive
      dpkg --configure -a && apt-get -f install -y -q && apt-get update -q && apt-get clean' \
    >>"$dir.tmp/debootstrap.log" 2>&1
  local rc=$?
  umount "$dir.tmp/root/proc"
  if [ $rc -ne 0 ]; then
    tail -20 "$dir.tmp/debootstrap.log" >&2
    echo "configuring the $suite root file system failed (log: $dir.tmp/debootstrap.log)" >&2
    return 1
  fi
  local bad
  bad=$(chroot "$dir.tmp/root" dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' | grep -v '^ii ')
  if [ -n "$bad" ]; then
    echo "packages not installed properly in the $suite root: $bad" >&2
    return 1
  fi
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  echo "$INCLUDE" >"$dir/ok"
  echo "$dir/root"
}

# ------------------------------------------------------------------------- containers
container_pid1() { # container_pid1 NSPAWN_PID: the container's PID 1 (a child of nspawn)
  local c
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    if [ "$(cat /proc/"$c"/comm 2>/dev/null)" = systemd ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}
poweroff_container() { # poweroff_container NSPAWN_PID
  local p1 i
  kill -0 "$1" 2>/dev/null || return 0
  p1=$(container_pid1 "$1") || {
    kill -KILL "$1" 2>/dev/null
    return 0
  }
  # Running VMs first: libvirt-guests would otherwise wait minutes for an ACPI shutdown that a
  # VM without an OS never does.
  timeout 30 nsenter -t "$p1" -a -- /bin/sh -c \
    'for d in $(virsh -q -c qemu:///system list --name); do virsh -q -c qemu:///system destroy "$d"; done' \
    >/dev/null 2>&1
  kill -RTMIN+4 "$p1" 2>/dev/null
  for ((i = 0; i < 300; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  # SIGKILL of the container's PID 1 ends every process of its PID namespace.
  kill -KILL "$p1" 2>/dev/null
  wait_for 10 eval "! kill -0 $1 2>/dev/null"
}
# in PID1 COMMAND: run COMMAND with /bin/sh inside the container, output to stdout/stderr.
on() {
  local p1=$1
  shift
  nsenter -t "$p1" -a -- /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive /bin/sh -c "$*"
}
wait_for() { # wait_for SECONDS CMD...: poll CMD every 0.1 s until it succeeds
  local i
  for ((i = 0; i < $1 * 10; i++)); do
    "${@:2}" && return 0
    sleep 0.1
  done
  return 1
}

boot() { # boot SUITE NAME HOSTNAME LOWER DIR: boots a container; sets BOOT_PID1 and BOOT_NSPAWN
  local suite=$1 name=$2 host=$3 lower=$4 d=$W/$5
  mkdir -p "$d/upper" "$d/work" "$d/root"
  if mountpoint -q "$d/root"; then
    : # booted again (after a power cut): same root, same overlay
  elif mount -t overlay overlay -o "lowerdir=$lower,upperdir=$d/upper,workdir=$d/work" "$d/root"; then
    MOUNTS+=("$d/root")
  else
    # No overlay on this file system (e.g. it is itself an overlay): a full copy instead.
    note "overlay mount failed; copying the root file system for $name"
    cp -a "$lower/." "$d/root/" || return 1
  fi
  # systemd sets the hostname from /etc/hostname (debootstrap copied this machine's): each host
  # needs its own, lockwarden records it in its holder records.
  echo "$host" >"$d/root/etc/hostname"
  systemd-nspawn -q -D "$d/root" --register=no --keep-unit -b -M "$name" --hostname="$host" \
    --bind="$W/images:/var/lib/libvirt/images" --console=read-only </dev/null >"$d/console.log" 2>&1 &
  BOOT_NSPAWN=$!
  NSPAWN_PIDS+=("$BOOT_NSPAWN")
  if ! wait_for 60 container_pid1 "$BOOT_NSPAWN" >/dev/null; then
    echo "container $name did not start (console: $(tail -5 "$d/console.log"))" >&2
    return 1
  fi
  BOOT_PID1=$(container_pid1 "$BOOT_NSPAWN")
  # Wait until systemd is up (running, or degraded: some unit failed; listed below).
  local state i
  # Until systemd has created /run/systemd/system, systemctl says "offline" (not booted with
  # systemd); until its bus socket is up, "Failed to connect to bus"; then --wait waits for the
  # boot to finish. (A loaded machine showed the "offline" window: the check came first.)
  for ((i = 0; i < 600; i++)); do
    state=$(timeout 120 nsenter -t "$BOOT_PID1" -a -- /bin/systemctl is-system-running --wait 2>&1)
    case $state in *'connect to bus'* | *'No such file'* | offline) sleep 0.1 ;; *) break ;; esac
  done
  case $state in
  running) ;;
  degraded) note "$name: degraded; failed units: $(on "$BOOT_PID1" 'systemctl --failed --no-legend --plain' | awk '{print $1}' | tr '\n' ' ')" ;;
  *)
    echo "container $name did not finish booting: is-system-running says '$state'" >&2
    return 1
    ;;
  esac
}

# ------------------------------------------------------------------------- the sampler
# sampler_start PATH: reads /proc/locks every 5 ms and counts the samples in which the file at
# PATH (on this machine) has no write lock on byte 0 (lockwarden's lease; QEMU's own locks are
# on bytes 100-104 and 200-204).
sampler_start() {
  rm -f "$W/sampler.stop" "$W/sampler.out" "$W/sampler.ready"
  python3 - "$1" "$W/sampler.stop" "$W/sampler.out" "$W/sampler.ready" <<'EOF' &
import os, sys, time
path, stop, out, ready = sys.argv[1:5]
st = os.stat(path)
key = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
taken = unlocked = 0
while not os.path.exists(stop):
    with open("/proc/locks") as f:
        data = f.read()
    held = False
    for line in data.splitlines():
        p = line.split()
        # "N: OFDLCK ADVISORY WRITE -1 fd:01:1234 0 0"; waiters are "N: -> OFDLCK ..."
        if len(p) >= 8 and p[1] != "->" and p[5] == key and p[6] == "0" and p[3] == "WRITE":
            held = True
            break
    taken += 1
    if not held:
        unlocked += 1
    if taken == 1:
        open(ready, "w").close()
    time.sleep(0.005)
with open(out, "w") as f:
    f.write("%d %d\n" % (taken, unlocked))
EOF
  SAMPLER_PID=$!
  # The action starts only once the first sample is taken.
  wait_for 10 test -e "$W/sampler.ready"
}
sampler_stop() { # sets SAMPLER_RESULT to "TAKEN UNLOCKED" (not in $(...): wait needs the parent)
  touch "$W/sampler.stop"
  wait "$SAMPLER_PID"
  SAMPLER_RESULT=$(cat "$W/sampler.out" 2>/dev/null || echo "0 0")
}

# ------------------------------------------------------------------------- one suite
domain_xml() { # domain_xml NAME UUID EMULATOR
  cat <<EOF
<domain type='qemu'>
  <name>$1</name>
  <uuid>$2</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$3</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='/var/log/libvirt/qemu/$1.serial'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# b_refused PID1 DOMAIN: tries to start DOMAIN on host B; prints "yes (WHO): message" when it
# is refused, "NO" when it started (it is destroyed again at once).
b_refused() {
  local out
  if out=$(on "$1" "timeout 60 virsh -q -c qemu:///system start $2" 2>&1); then
    on "$1" "virsh -q -c qemu:///system destroy $2" >/dev/null 2>&1
    echo "NO"
    return 1
  fi
  out=$(printf '%s' "$out" | tr '\n' ' ' | sed 's/  */ /g')
  case $out in
  *'Failed to get "write" lock'* | *'Failed to get shared "write" lock'*) echo "yes (QEMU's image lock): $out" ;;
  *lockwarden* | *'resource busy'* | *'is locked'*) echo "yes (lockwarden): $out" ;;
  *) echo "yes (other): $out" ;;
  esac
}

main_pid() { # main_pid PID1: lockwardend's MainPID, or nothing when it has none
  local p
  p=$(on "$1" 'systemctl show -p MainPID --value lockwardend.service' 2>/dev/null)
  case $p in '' | 0 | *[!0-9]*) return 1 ;; esac
  echo "$p"
}
installed_version() { # installed_version PID1: the lockwarden package version installed there
  on "$1" 'dpkg-query -W lockwarden' 2>/dev/null | awk '{print $2}'
}
no_keeper() { # no_keeper PID1: no keeper process (lockwardend-kpr) runs on that host
  local out
  out=$(on "$1" 'for c in /proc/[0-9]*/comm; do [ "$(cat $c 2>/dev/null)" = lockwardend-kpr ] && echo $c; done')
  [ -z "$out" ]
}
listed() { # listed PID1 NAME: `lockwarden list` on that host shows domain NAME
  local out
  out=$(on "$1" 'lockwarden list' 2>/dev/null)
  grep -qw -- "$2" <<<"$out"
}

run_suite() {
  local suite=$1 lower
  echo "=== suite $suite"
  lower=$(rootfs "$suite") || {
    fail "$suite: root file system"
    return
  }
  note "$suite: root file system $lower"
  rm -rf "$W/images" "$W/a" "$W/b"
  mkdir -p "$W/images"
  local A B NA NB
  boot "$suite" "lwd-$suite-a" lwd-host-a "$lower" a || {
    fail "$suite: boot host A"
    return
  }
  A=$BOOT_PID1 NA=$BOOT_NSPAWN
  boot "$suite" "lwd-$suite-b" lwd-host-b "$lower" b || {
    fail "$suite: boot host B"
    return
  }
  B=$BOOT_PID1 NB=$BOOT_NSPAWN
  note "$suite: host A pid1 $A, host B pid1 $B; $(on "$A" 'systemctl --version | head -1'); $(on "$A" 'libvirtd --version'); $(on "$A" 'qemu-system-x86_64 --version | head -1')"

  # --- install the package with apt on both hosts
  local h p
  for h in A B; do
    p=${!h}
    cp "$DEB" "$BUMPED" "$W/${h,,}/root/root/"
    if out=$(on "$p" "apt-get install -y -q /root/$(basename "$DEB")" 2>&1) ||
      out=$(on "$p" "apt-get update -q && apt-get install -y -q /root/$(basename "$DEB")" 2>&1); then
      pass "$suite: apt-get install ./$(basename "$DEB") on host $h"
    else
      fail "$suite: apt-get install on host $h" "$(printf '%s\n' "$out" | tail -15)"
      return
    fi
  done
  # Installed: the sockets enabled and listening, the service not started.
  local st
  st=$(on "$A" 'for u in lockwardend.socket lockwardend-admin.socket lockwardend.service; do
      echo "$u $(systemctl is-enabled $u 2>&1) $(systemctl is-active $u 2>&1)"; done')
  # (grep -q on a here-string, never at the end of a pipe: with pipefail, the writer's SIGPIPE
  # when grep -q exits early would turn a match into a failure.)
  if grep -qx 'lockwardend.socket enabled active' <<<"$st" &&
    grep -qx 'lockwardend-admin.socket enabled active' <<<"$st" &&
    grep -q '^lockwardend.service .* inactive$' <<<"$st"; then
    pass "$suite: after install: both sockets enabled and listening, lockwardend.service not started"
  else
    fail "$suite: after install: sockets enabled and listening, service not started" "$st"
  fi
  local so
  so=$(on "$A" 'ls /usr/lib/x86_64-linux-gnu/libvirt/lock-driver/')
  note "$suite: lock-driver dir: $(echo $so)"

  # --- qemu.conf: lock_manager plus what the container forces; libvirtd restarted
  for h in A B; do
    p=${!h}
    on "$p" 'cat >>/etc/libvirt/qemu.conf <<EOF

# tests/distro: the lock manager under test
lock_manager = "lockwarden"
# tests/distro: forced by the container (read-only cgroup v1 controllers, no mount namespaces)
cgroup_controllers = [ ]
namespaces = [ ]
EOF
      systemctl restart libvirtd' || fail "$suite: restart libvirtd on $h"
  done
  on "$A" 'qemu-img create -q -f qcow2 /var/lib/libvirt/images/disk.qcow2 64M' ||
    { fail "$suite: qemu-img create"; return; }
  cp "$HERE/../e2e/qemu-nolock.sh" "$W/b/root/usr/local/bin/qemu-nolock"
  chmod 755 "$W/b/root/usr/local/bin/qemu-nolock"
  domain_xml lw-vm 3b5a8f9e-0000-4000-8000-00000000000a /usr/bin/qemu-system-x86_64 >"$W/a/root/root/vm.xml"
  domain_xml lw-vm-b 3b5a8f9e-0000-4000-8000-00000000000b /usr/bin/qemu-system-x86_64 >"$W/b/root/root/vm-b.xml"
  domain_xml lw-vm-b-nolock 3b5a8f9e-0000-4000-8000-00000000000c /usr/local/bin/qemu-nolock >"$W/b/root/root/vm-b-nolock.xml"
  on "$A" 'virsh -q -c qemu:///system define /root/vm.xml' >/dev/null || { fail "$suite: define on A"; return; }
  on "$B" 'virsh -q -c qemu:///system define /root/vm-b.xml && virsh -q -c qemu:///system define /root/vm-b-nolock.xml' >/dev/null ||
    { fail "$suite: define on B"; return; }

  # --- socket activation: the first VM start starts lockwardend
  if out=$(on "$A" 'timeout 60 virsh -q -c qemu:///system start lw-vm' 2>&1); then
    pass "$suite: VM lw-vm starts on host A"
  else
    fail "$suite: VM lw-vm starts on host A" "$out" "$(on "$A" 'journalctl -b --no-pager -u libvirtd -u lockwardend | tail -20')"
    return
  fi
  if on "$A" 'systemctl is-active --quiet lockwardend.service' &&
    grep -q 'Start' <<<"$(on "$A" 'journalctl -b --no-pager -u lockwardend.service')"; then
    pass "$suite: socket activation: lockwardend.service started by the first VM start"
  else
    fail "$suite: socket activation" "$(on "$A" 'systemctl status --no-pager lockwardend.service lockwardend.socket' 2>&1 | head -20)"
  fi
  local disk=$W/images/disk.qcow2
  local lockline
  lockline=$(python3 -c 'import os,sys; st=os.stat(sys.argv[1]); print("%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))' "$disk")
  note "$suite: /proc/locks lines of the disk ($lockline): $(grep " $lockline " /proc/locks | awk '{print $2, $4, $7 "-" $8}' | tr '\n' ';')"
  if listed "$A" lw-vm; then pass "$suite: lockwarden list on A shows lw-vm"; else fail "$suite: lockwarden list on A shows lw-vm" "$(on "$A" 'lockwarden list' 2>&1)"; fi

  # The admin command's own check of the host set-up (after the first VM start: asking the
  # admin socket would itself start the daemon).
  local doc doc_rc=0
  doc=$(on "$A" 'lockwarden doctor' 2>&1) || doc_rc=$?
  if [ "$doc_rc" = 0 ] && ! grep -qE '^(WARN|FAIL)' <<<"$doc"; then
    pass "$suite: lockwarden doctor on A: every check OK ($(grep -c '^OK' <<<"$doc") checks)"
  else
    fail "$suite: lockwarden doctor on A (exit $doc_rc)" "$doc"
  fi

  local r
  r=$(b_refused "$B" lw-vm-b) && pass "$suite: the disk of A's VM is refused on B, QEMU locking on: $r" ||
    fail "$suite: the disk of A's VM is refused on B, QEMU locking on" "$r"
  r=$(b_refused "$B" lw-vm-b-nolock) && pass "$suite: ... refused on B with QEMU locking off: $r" ||
    fail "$suite: the disk of A's VM is refused on B with QEMU locking off" "$r"

  # --- the lifecycle table
  local rows=()
  lifecycle() { # lifecycle LABEL CHECK COMMAND: runs COMMAND on A with the sampler on
    local label=$1 check=$2 cmd=$3 before after res taken unl lst rq rl ok=1 extra=''
    before=$(main_pid "$A")
    sampler_start "$disk"
    if ! out=$(on "$A" "$cmd" 2>&1); then
      ok=0
      extra="command failed: $out"
    fi
    # Back: the service active with a main pid, and the VM listed (bounded wait).
    wait_for 30 main_pid "$A" >/dev/null
    wait_for 30 on "$A" 'systemctl is-active --quiet lockwardend.service'
    if wait_for 30 listed "$A" lw-vm; then lst=yes; else lst=NO; ok=0; fi
    rq=$(b_refused "$B" lw-vm-b) || ok=0
    rl=$(b_refused "$B" lw-vm-b-nolock) || ok=0
    sampler_stop
    res=$SAMPLER_RESULT
    taken=${res% *} unl=${res#* }
    after=$(main_pid "$A")
    [ "$unl" = 0 ] && [ "$taken" -gt 0 ] || ok=0
    if [ -n "$check" ] && ! c=$(eval "$check" 2>&1); then
      ok=0
      extra="$extra $c"
    fi
    [ "$(on "$A" 'virsh -q -c qemu:///system domstate lw-vm')" = running ] || { ok=0; extra="$extra; lw-vm not running"; }
    rows+=("$(printf '%-44s %8s %9s %7s %-26s %-20s %s' "$label" "$taken" "$unl" "$lst" \
      "${rq%%:*}" "${rl%%:*}" "${before:--}->${after:--}")")
    if [ "$ok" = 1 ]; then
      pass "$suite: $label: $taken samples, $unl unlocked, listed $lst, B refused ($rq) ($rl)"
    else
      fail "$suite: $label: $taken samples, $unl unlocked, listed $lst" "B with QEMU locking: $rq" \
        "B without: $rl" "daemon pid $before -> $after" $extra
    fi
  }
  local bp
  lifecycle "systemctl restart lockwardend" '[ "$before" != "$after" ] || echo "main pid unchanged"' \
    'systemctl restart lockwardend'
  lifecycle "systemctl stop lockwardend + sockets; start" '' \
    'systemctl stop lockwardend.service lockwardend.socket lockwardend-admin.socket &&
     ! systemctl is-active --quiet lockwardend.service &&
     systemctl start lockwardend.socket lockwardend-admin.socket lockwardend.service'
  bp=$(main_pid "$A")
  if [ -n "$bp" ] && [ "$bp" -gt 1 ]; then
    lifecycle "kill -9 MainPID (systemd restarts it)" '[ "$before" != "$after" ] || echo "not restarted"' \
      "kill -9 $bp"
  else
    fail "$suite: kill -9 MainPID: lockwardend has no main pid ('$bp')"
  fi
  lifecycle "systemctl reload lockwardend (re-exec)" '[ "$before" = "$after" ] || echo "main pid changed: restarted, not re-executed"' \
    'systemctl reload lockwardend'
  lifecycle "apt-get install newer .deb (upgrade)" \
    'v=$(installed_version "$A"); [ "$v" = "${DEB_VERSION}+distrotest1" ] || echo "installed version $v";
     [ "$before" = "$after" ] || echo "main pid changed: restarted, not re-executed";
     e=$(on "$A" "readlink /proc/$after/exe"); case $e in *deleted*) echo "still runs the replaced binary: $e";; esac' \
    "apt-get install -y -q /root/$(basename "$BUMPED")"
  lifecycle "systemctl restart libvirtd" '' 'systemctl restart libvirtd && sleep 1 &&
     virsh -q -c qemu:///system list --name | grep -x lw-vm >/dev/null'

  echo "--- $suite lifecycle table (sampler: /proc/locks every 5 ms, inode $lockline, byte 0)"
  printf '%-44s %8s %9s %7s %-26s %-20s %s\n' action samples unlocked listed "refused on B (as shipped)" \
    "B, QEMU locking off" "daemon pid"
  printf '%s\n' "${rows[@]}"
  echo "--- end of $suite table"

  # --- logs: lockwardend's journal with priorities (B: the refusals; A: the lifecycle)
  local h2
  for h2 in B A; do
    note "$suite: host $h2: journalctl -u lockwardend, priority and message (refusals, lifecycle):"
    on "${!h2}" 'journalctl -b --no-pager -o json -u lockwardend.service' 2>/dev/null | python3 -c '
import json, sys
names = {"0": "emerg", "1": "alert", "2": "crit", "3": "err", "4": "warning", "5": "notice", "6": "info", "7": "debug"}
for line in sys.stdin:
    e = json.loads(line)
    m = e.get("MESSAGE")
    if not isinstance(m, str) or e.get("_COMM") == "systemd":
        continue
    if any(w in m for w in ("refus", "in use", "busy", "keeper", "re-exec", "stopping", "serving", "signal", "took back", "taken back", "lost")):
        print("#   %-7s %s" % (names.get(e.get("PRIORITY"), "?"), m[:220]))
' | tail -14
  done

  local jb ja
  jb=$(on "$B" 'journalctl -b --no-pager -o json -u lockwardend.service' 2>/dev/null)
  ja=$(on "$A" 'journalctl -b --no-pager -o json -u lockwardend.service' 2>/dev/null)
  if r=$(python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    m = e.get("MESSAGE")
    if isinstance(m, str) and m.startswith("refused acquire for VM \"lw-vm-b-nolock\"") and "in use by VM" in m:
        print("priority %s: %s" % (e.get("PRIORITY"), m[:160])); sys.exit(0)
sys.exit(1)' <<<"$jb"); then
    pass "$suite: B's journal (-u lockwardend) logs the refusal naming the holder: $r"
  else
    fail "$suite: B's journal (-u lockwardend) logs the refusal"
  fi
  if r=$(python3 -c '
import json, sys
want = {"keeper kept the lease over kill -9 (warning)": ("lockwardend disconnected; holding", "4"),
        "lease taken back from the keeper (info)": ("took back 1 of 1 lease", "6"),
        "live re-exec on reload (info)": ("live re-exec #", "6")}
seen = set()
for line in sys.stdin:
    e = json.loads(line)
    m = e.get("MESSAGE")
    for k, (text, prio) in want.items():
        if isinstance(m, str) and text in m and e.get("PRIORITY") == prio:
            seen.add(k)
missing = sorted(set(want) - seen)
print(", ".join(missing) if missing else ", ".join(sorted(seen)))
sys.exit(1 if missing else 0)' <<<"$ja"); then
    pass "$suite: A's journal (-u lockwardend) logs the lifecycle: $r"
  else
    fail "$suite: A's journal (-u lockwardend) logs the lifecycle" "missing: $r"
  fi
  # --- journal fields (issue 18): the refusal is an entry with its own MESSAGE_ID and fields
  local refused_id=123b73ac354b4bc2b4534b8d732fb4ab
  if r=$(on "$B" "journalctl -b --no-pager -o json MESSAGE_ID=$refused_id" 2>/dev/null | python3 -c '
import json, sys
def one(v):
    return v if isinstance(v, str) else (v or [None])[0] if isinstance(v, list) else v
for line in sys.stdin:
    e = json.loads(line)
    disk = e.get("DISK")
    disks = disk if isinstance(disk, list) else [disk]
    if (e.get("VM_NAME") == "lw-vm-b-nolock" and "/var/lib/libvirt/images/disk.qcow2" in disks
            and e.get("VM_UUID") == "3b5a8f9e-0000-4000-8000-00000000000c"
            and e.get("SYSLOG_IDENTIFIER") == "lockwardend"):
        print("VM_NAME=%s DISK=%s HOLDER_HOST=%s REASON=%s PRIORITY=%s" % (e["VM_NAME"], disks[0],
              one(e.get("HOLDER_HOST")), one(e.get("REASON")), e.get("PRIORITY")))
        sys.exit(0)
sys.exit(1)'); then
    pass "$suite: journalctl MESSAGE_ID=$refused_id on B lists the refusal with its fields: $r"
  else
    fail "$suite: journalctl MESSAGE_ID=$refused_id on B lists the refusal with VM_NAME, VM_UUID, DISK" \
      "$(on "$B" "journalctl -b --no-pager -o verbose -u lockwardend.service | grep -B3 -A25 'refused acquire' | tail -40" 2>&1)"
  fi
  local acquired_id=7e1efc46dd434ecbabb3cd01ba8211db
  if on "$A" "journalctl -b --no-pager -o json MESSAGE_ID=$acquired_id VM_NAME=lw-vm" 2>/dev/null | grep -q .; then
    pass "$suite: journalctl MESSAGE_ID=$acquired_id VM_NAME=lw-vm on A lists lw-vm's acquires"
  else
    fail "$suite: journalctl MESSAGE_ID=$acquired_id VM_NAME=lw-vm on A lists lw-vm's acquires"
  fi

  # --- the metrics timer (issue 18): shipped disabled; enabled, it writes node_exporter's
  # textfile atomically, in a format promtool (and so node_exporter) reads
  st=$(on "$A" 'systemctl is-enabled lockwarden-metrics.timer 2>&1; systemctl is-active lockwarden-metrics.timer 2>&1')
  if [ "$(tr '\n' ' ' <<<"$st")" = 'disabled inactive ' ]; then
    pass "$suite: lockwarden-metrics.timer is installed disabled"
  else
    fail "$suite: lockwarden-metrics.timer is installed disabled" "$st"
  fi
  local tf=$W/a/root/var/lib/prometheus/node-exporter/lockwarden.prom
  if out=$(on "$A" 'mkdir -p /var/lib/prometheus/node-exporter &&
      systemctl enable --now lockwarden-metrics.timer &&
      systemctl start lockwarden-metrics.service &&
      systemctl is-active lockwarden-metrics.timer' 2>&1) && [ -s "$tf" ]; then
    local pt
    if pt=$(promtool check metrics <"$tf" 2>&1) &&
      grep -qx 'lockwarden_up 1' "$tf" && grep -qx 'lockwarden_keeper_up 1' "$tf" &&
      grep -qx '# TYPE lockwarden_acquires_total counter' "$tf" &&
      ! grep -q '^# EOF' "$tf"; then
      pass "$suite: lockwarden-metrics.timer enabled: the service wrote lockwarden.prom ($(wc -l <"$tf") lines; promtool check metrics: ok; $(grep -E '^lockwarden_(acquires_total|leases\{)' "$tf" | tr '\n' ' '))"
    else
      fail "$suite: lockwarden.prom written by the service parses" "$pt" "$(head -30 "$tf")"
    fi
  else
    fail "$suite: lockwarden-metrics.timer enabled writes lockwarden.prom" "$out" \
      "$(on "$A" 'systemctl status --no-pager lockwarden-metrics.service; journalctl -b --no-pager -u lockwarden-metrics.service | tail' 2>&1)"
  fi
  # The timer stays enabled: the removal and purge checks below then also prove that an
  # operator-enabled timer is stopped with the package and leaves nothing behind.

  if on "$A" 'test -x /usr/sbin/virtqemud'; then
    info "$suite ships virtqemud: this suite runs against libvirtd only (not yet against virtqemud)"
  else
    info "$suite ships no virtqemud (only the monolithic libvirtd): nothing more to run"
  fi

  # --- apt remove with a VM running: refused for each reason, nothing changes
  remove_refused() { # remove_refused WHAT REASON-PATTERN
    local out
    if out=$(on "$A" 'apt-get remove -y -q lockwarden' 2>&1); then
      fail "$suite: apt-get remove $1 is refused" "$(printf '%s\n' "$out" | tail -5)"
    elif ! grep -q "lockwarden: refusing.*$2" <<<"$out"; then
      fail "$suite: apt-get remove $1 is refused for the right reason ($2)" "$(printf '%s\n' "$out" | tail -6)"
    elif [ "$(on "$A" "dpkg-query -W -f='\${db:Status-Abbrev}' lockwarden")" != 'ii ' ] || ! listed "$A" lw-vm; then
      fail "$suite: apt-get remove $1 refused but the package or the lease changed" "$(printf '%s\n' "$out" | tail -8)"
    else
      pass "$suite: apt-get remove $1 is refused, package and lease kept: $(printf '%s\n' "$out" | grep -o 'lockwarden: refusing.*' | head -1)"
    fi
  }
  remove_refused "with a VM running and qemu.conf selecting lockwarden" "qemu.conf sets lock_manager"
  # The operator removed the line but the VM still runs (libvirtd not restarted yet).
  on "$A" 'cp /etc/libvirt/qemu.conf /root/qemu.conf.keep && sed -i "/^lock_manager = \"lockwarden\"/d" /etc/libvirt/qemu.conf'
  remove_refused "with a VM running (qemu.conf no longer selecting lockwarden)" "holds 1 lease"
  on "$A" 'cp /root/qemu.conf.keep /etc/libvirt/qemu.conf'

  # --- a VM destroyed while the daemon is stopped frees its disk once it is back
  on "$A" 'systemctl stop lockwardend.service lockwardend.socket lockwardend-admin.socket'
  on "$A" 'virsh -q -c qemu:///system destroy lw-vm' >/dev/null 2>&1
  on "$A" 'systemctl start lockwardend.socket lockwardend-admin.socket lockwardend.service'
  if wait_for 30 eval "! grep -q ' $lockline 0 ' /proc/locks" && ! listed "$A" lw-vm; then
    pass "$suite: VM destroyed while lockwardend was stopped: its disk is free once the daemon is back"
    if out=$(on "$B" 'timeout 60 virsh -q -c qemu:///system start lw-vm-b' 2>&1); then
      pass "$suite: ... and host B can start a VM on it"
      on "$B" 'virsh -q -c qemu:///system destroy lw-vm-b' >/dev/null 2>&1
    else
      fail "$suite: host B starts a VM on the freed disk" "$out"
    fi
  else
    fail "$suite: VM destroyed while lockwardend was stopped frees its disk" \
      "$(grep " $lockline " /proc/locks)" "$(on "$A" 'lockwarden list' 2>&1)"
  fi

  # --- host A loses power with a VM running, and boots again: no stale lease anywhere
  if on "$A" 'timeout 60 virsh -q -c qemu:///system start lw-vm' >/dev/null 2>&1 && listed "$A" lw-vm; then
    kill -KILL "$A"
    wait_for 30 eval "! kill -0 $NA 2>/dev/null"
    if boot "$suite" "lwd-$suite-a" lwd-host-a "$lower" a; then
      A=$BOOT_PID1 NA=$BOOT_NSPAWN
      local who_out who_rc=0
      who_out=$(on "$B" 'lockwarden who /var/lib/libvirt/images/disk.qcow2' 2>&1) || who_rc=$?
      if grep -q " $lockline 0 " /proc/locks; then
        fail "$suite: after a power cut and reboot of A, the disk is still locked" "$(grep " $lockline " /proc/locks)"
      elif listed "$A" lw-vm; then
        fail "$suite: after a power cut and reboot of A, lockwardend on A still lists lw-vm" "$(on "$A" 'lockwarden list' 2>&1)"
      elif [ "$who_rc" != 1 ]; then
        fail "$suite: after a power cut of A, lockwarden who on B says the disk is free (exit 1)" "exit $who_rc: $who_out"
      elif ! out=$(on "$B" 'timeout 60 virsh -q -c qemu:///system start lw-vm-b' 2>&1); then
        fail "$suite: after a power cut of A, B starts a VM on the disk" "$out"
      else
        on "$B" 'virsh -q -c qemu:///system destroy lw-vm-b' >/dev/null 2>&1
        pass "$suite: A lost power with lw-vm running and booted again: no lock, no lease listed, lockwarden who on B: $(tr '\n' ' ' <<<"$who_out"), B starts a VM on the disk"
      fi
    else
      fail "$suite: boot host A again after the power cut"
      return
    fi
  else
    fail "$suite: start lw-vm on A for the power-cut check"
  fi

  # --- forced removal with a VM running: the keeper keeps its lease until the VM exits
  if out=$(on "$A" 'timeout 60 virsh -q -c qemu:///system start lw-vm' 2>&1) && listed "$A" lw-vm; then
    sampler_start "$disk"
    if out=$(on "$A" 'LOCKWARDEN_FORCE_REMOVE=1 apt-get remove -y -q lockwarden' 2>&1); then
      sampler_stop
      res=$SAMPLER_RESULT
      r=$(b_refused "$B" lw-vm-b-nolock)
      if [ "${res#* }" = 0 ] && [ "${res% *}" -gt 0 ] && [ "${r%%:*}" = "yes (lockwarden)" ]; then
        pass "$suite: LOCKWARDEN_FORCE_REMOVE=1 apt-get remove with a VM running: ${res% *} samples, 0 unlocked; B still refused by lockwarden (the keeper holds the lease)"
      else
        fail "$suite: forced removal with a VM running keeps the lease" "samples/unlocked: $res" "B: $r"
      fi
      on "$A" 'virsh -q -c qemu:///system destroy lw-vm' >/dev/null 2>&1
      if wait_for 30 eval "! grep -q ' $lockline 0 ' /proc/locks" &&
        wait_for 30 no_keeper "$A"; then
        pass "$suite: ... the VM destroyed: the keeper frees the disk and exits"
      else
        fail "$suite: after forced removal, destroying the VM frees the disk and ends the keeper" \
          "$(grep " $lockline " /proc/locks)" "$(on "$A" 'ps -eo pid,comm | grep lockwarden')"
      fi
    else
      sampler_stop
      fail "$suite: LOCKWARDEN_FORCE_REMOVE=1 apt-get remove" "$(printf '%s\n' "$out" | tail -6)"
    fi
  else
    fail "$suite: restart lw-vm on A for the forced-removal check" "$out"
  fi

  # --- purge: after the operator's steps (no VMs, lock_manager removed), nothing is left
  for h in A B; do
    p=${!h}
    on "$p" 'sed -i "/^lock_manager = \"lockwarden\"/d" /etc/libvirt/qemu.conf && systemctl restart libvirtd'
    if out=$(on "$p" 'apt-get purge -y -q lockwarden' 2>&1); then
      left=$(on "$p" 'dpkg-query -W -f="\${db:Status-Abbrev}\n" lockwarden 2>/dev/null | grep -v "^un"
        ls -d /usr/sbin/lockwardend /usr/bin/lockwarden /usr/lib/*/libvirt/lock-driver/lockwarden.so \
          /etc/libvirt/*lockwarden* /lib/systemd/system/lockwarden* /usr/lib/systemd/system/lockwarden* \
          /etc/systemd/system/*/lockwarden* /var/lib/systemd/deb-systemd-helper-enabled/*lockwarden* \
          /var/lib/systemd/deb-systemd-helper-enabled/*/lockwarden* /run/lockwarden \
          /usr/share/man/*/lockwarden* /usr/share/augeas/lenses/*lockwarden* /usr/share/doc/lockwarden 2>/dev/null
        for c in /proc/[0-9]*/comm; do case $(cat $c 2>/dev/null) in lockwardend*) echo "process ${c%/comm}";; esac; done
        systemctl list-units --all --no-legend --plain "lockwarden*" 2>/dev/null | grep -v "not-found"')
      if [ -z "$left" ]; then
        pass "$suite: apt-get purge on $h leaves nothing behind"
      else
        fail "$suite: apt-get purge on $h leaves nothing behind" "$left"
      fi
    else
      fail "$suite: apt-get purge on $h" "$(printf '%s\n' "$out" | tail -8)"
    fi
  done

  poweroff_container "$NA"
  poweroff_container "$NB"
  umount "$W/a/root" "$W/b/root" 2>/dev/null
}

for s in "${SUITES[@]}"; do
  run_suite "$s"
done
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
