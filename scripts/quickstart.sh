#!/usr/bin/env bash
# lockwarden quick start, for a fresh Debian 12 machine, as root:
#
#   bash scripts/quickstart.sh [--no-deps] [--yes] [--keep]
#
# 1. installs the Debian packages the build and the demo need and that are missing (its own
#    short list, QS_PACKAGES below, not the CI's .ci/install-deps): it prints the packages it
#    would install and asks first; it never removes a package, and the only installed package
#    it may change (said, and asked for) is a backports qemu-utils brought to Debian 12's QEMU
#    (apt-get --no-remove, and a dry run that must show no removal), and it installs nothing
#    when everything is there;
# 2. builds lockwarden with meson + cargo and installs it into a private prefix
#    ($LOCKWARDEN_QS_DIR/prefix, default /tmp/lockwarden-quickstart/prefix);
# 3. in a private mount namespace (its own /etc/libvirt, /run/libvirt, /var/lib/libvirt,
#    /var/cache/libvirt, /var/log/libvirt and /run/lockwarden, so the machine's own libvirt is
#    left alone) starts lockwardend and a real libvirtd with lock_manager = "lockwarden" and
#    the default plugin configuration (direct mode: the disk image itself is locked),
#    starts a tiny VM, and shows a second VM on the same disk refused by lockwarden, naming the
#    VM that holds the disk;
# 4. stops everything it started and removes the demo's files. The build and the private prefix
#    stay (re-runs are quick); remove them with: rm -rf /tmp/lockwarden-quickstart
#
#   --no-deps  skip step 1 (the packages are already installed)
#   --yes      install the missing packages without asking (needed without a terminal)
#   --keep     keep the demo's files (logs, XML, disk image) for a look afterwards
#
# Needs: Debian 12, root, cargo (Rust >= 1.85, e.g. from rustup) in PATH or in ~/.cargo/bin.
# Exit status 0 only if the second VM was refused by lockwarden.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QS=${LOCKWARDEN_QS_DIR:-/tmp/lockwarden-quickstart}
PREFIX=$QS/prefix
BUILD=$QS/build
PLUGIN_DIR=$PREFIX/lib/libvirt/lock-driver
# The system directories the demo's libvirtd and lockwardend get private copies of.
NS_DIRS=(/etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /run/lockwarden)

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
  printf 'quickstart: %s\n' "$*" >&2
  exit 1
}

# ------------------------------------------------------------------------------------------
# Inside the private mount namespace (the script re-runs itself there, under a subreaper).
# ------------------------------------------------------------------------------------------
demo() {
  local run=$1
  local vm1=qs-vm1 vm2=qs-vm2 disk=$run/images/shared-disk.img
  # Global, not local: the EXIT trap runs after this function has returned.
  LWD_PID=''
  LIBVIRTD_PID=''

  # shellcheck disable=SC2317 # called through the EXIT trap
  cleanup_demo() {
    local rc=$? dom pid f
    trap - EXIT INT TERM
    say "cleaning up"
    if [ -n "$LIBVIRTD_PID" ] && kill -0 "$LIBVIRTD_PID" 2>/dev/null; then
      for dom in $(virsh -q list --name 2>/dev/null); do
        virsh -q destroy "$dom" >/dev/null 2>&1 && info "destroyed $dom"
      done
      kill -TERM "$LIBVIRTD_PID" 2>/dev/null
      wait_gone "$LIBVIRTD_PID" 15 || kill -KILL "$LIBVIRTD_PID" 2>/dev/null
      info "stopped libvirtd"
    fi
    for f in /run/libvirt/qemu/*.pid; do
      [ -e "$f" ] || continue
      pid=$(cat "$f" 2>/dev/null) && [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
    done
    if [ -n "$LWD_PID" ] && kill -0 "$LWD_PID" 2>/dev/null; then
      kill -TERM "$LWD_PID" 2>/dev/null
      wait_gone "$LWD_PID" 10 || kill -KILL "$LWD_PID" 2>/dev/null
      info "stopped lockwardend"
    fi
    exit "$rc"
  }
  trap cleanup_demo EXIT
  trap 'exit 130' INT TERM

  # wait_gone PID SECONDS: true once PID has exited (reaping it if it is our child).
  # shellcheck disable=SC2317 # called from the EXIT trap
  wait_gone() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
      kill -0 "$1" 2>/dev/null || { wait "$1" 2>/dev/null || true; return 0; }
      sleep 0.1
    done
    return 1
  }

  local d
  for d in "${NS_DIRS[@]}"; do
    mount --bind "$run/ns${d}" "$d"
  done
  info "private ${NS_DIRS[*]}"

  # libvirt's configuration, as a container-friendly test host needs it (no cgroups, no
  # security driver, no seccomp, no virtlogd).
  cat >/etc/libvirt/qemu.conf <<'EOF'
lock_manager = "lockwarden"
security_driver = "none"
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
seccomp_sandbox = 0
stdio_handler = "file"
EOF
  cat >/etc/libvirt/libvirtd.conf <<'EOF'
auth_unix_ro = "none"
auth_unix_rw = "none"
log_filters = "1:locking 3:*"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  # The plugin's configuration as installed: every key commented out, so all defaults.
  cp "$PREFIX/etc/libvirt/qemu-lockwarden.conf" /etc/libvirt/qemu-lockwarden.conf
  info "/etc/libvirt/qemu.conf: lock_manager = \"lockwarden\"; qemu-lockwarden.conf: the installed defaults"

  say "starting lockwardend (sockets in the private /run/lockwarden)"
  "$PREFIX/sbin/lockwardend" --config "$PREFIX/etc/libvirt/lockwardend.conf" \
    </dev/null >/var/log/libvirt/lockwardend.log 2>&1 &
  LWD_PID=$!
  local i
  for ((i = 0; i < 100; i++)); do
    [ -S /run/lockwarden/lockwardend.sock ] && break
    kill -0 "$LWD_PID" 2>/dev/null || break
    sleep 0.1
  done
  if ! [ -S /run/lockwarden/lockwardend.sock ] || ! kill -0 "$LWD_PID" 2>/dev/null; then
    sed 's/^/    | /' /var/log/libvirt/lockwardend.log >&2
    die "lockwardend did not start (log above)"
  fi
  info "lockwardend pid $LWD_PID listening on /run/lockwarden/lockwardend.sock"

  say "starting libvirtd with lock_manager = \"lockwarden\""
  LIBVIRT_LOCK_MANAGER_PLUGIN_DIR=$PLUGIN_DIR libvirtd -p /run/libvirt/libvirtd.pid \
    </dev/null >/var/log/libvirt/libvirtd.out 2>&1 &
  LIBVIRTD_PID=$!
  for ((i = 0; i < 600; i++)); do
    virsh -q uri >/dev/null 2>&1 && break
    if ! kill -0 "$LIBVIRTD_PID" 2>/dev/null; then
      grep -E 'error|Initialization' /var/log/libvirt/libvirtd.log 2>/dev/null | tail -8 | sed 's/^/    | /' >&2
      die "libvirtd exited during start-up (it does so when the lock manager plugin cannot be loaded)"
    fi
    sleep 0.1
  done
  virsh -q uri >/dev/null 2>&1 || die "libvirtd did not answer within 60 s"
  info "libvirtd pid $LIBVIRTD_PID loads $PLUGIN_DIR/lockwarden.so"

  # Two tiny VMs (TCG, 32 MiB, no OS: SeaBIOS idles) on one disk image.
  truncate -s 16M "$disk"
  local name uuid
  for name in $vm1 $vm2; do
    uuid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$run/$name.xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
  <uuid>$uuid</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>$run/qemu-nolock</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='/var/log/libvirt/qemu/$name.serial'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
  done

  say "starting $vm1 on $disk"
  virsh create "$run/$vm1.xml" || die "$vm1 did not start (see $run/ns/var/log/libvirt/qemu/$vm1.log)"
  virsh list
  if command -v lslocks >/dev/null; then
    # lslocks cannot name the file of an OFD lock (no owning pid), so match the image's inode.
    info "the kernel's view: lockwardend's OFD lock on byte 0 of the image (QEMU's own are off):"
    lslocks -o TYPE,MODE,START,END,INODE 2>/dev/null |
      awk -v ino="$(stat -c %i "$disk")" -v d="$disk" 'NR == 1 { print $0, "PATH" } NR > 1 && $5 == ino { print $0, d }' |
      sed 's/^/      /'
  fi

  say "starting $vm2 on the same disk: lockwarden must refuse it"
  local out rc=0
  out=$(virsh create "$run/$vm2.xml" 2>&1) || rc=$?
  printf '%s\n' "$out" | sed 's/^/    | /'
  if [ "$rc" -eq 0 ]; then
    die "$vm2 STARTED although $vm1 holds $disk: the disk is NOT protected"
  fi
  if printf '%s' "$out" | grep -q 'Failed to get .* lock'; then
    die "$vm2 was refused by QEMU's own image locking, not by lockwarden (is the emulator wrapper in use?)"
  fi
  if ! printf '%s' "$out" | grep -q "$vm1"; then
    die "$vm2 was refused, but the error does not name $vm1, the VM holding the disk"
  fi
  info "refused, and the error names the holder ($vm1)"

  say "destroying $vm1: its lease goes with it, so $vm2 may now start"
  virsh -q destroy $vm1
  virsh create "$run/$vm2.xml" || die "$vm2 still cannot start after $vm1 was destroyed"
  virsh list
  virsh -q destroy $vm2

  say "done: lockwarden kept two VMs off one disk"
}

if [ "${1:-}" = --inside ]; then
  RUN=$2
  demo "$RUN"
  exit 0
fi

# ------------------------------------------------------------------------------------------
# Outside: dependencies, build, install, then the demo in its namespace.
# ------------------------------------------------------------------------------------------
DEPS=1
KEEP=0
YES=0
for arg in "$@"; do
  case $arg in
  --no-deps) DEPS=0 ;;
  --yes) YES=1 ;;
  --keep) KEEP=1 ;;
  -h | --help)
    sed -n '2,27p' "$0"
    exit 0
    ;;
  *) die "unknown argument $arg (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root: it installs packages and starts a system libvirtd (in a private mount namespace)"
if ! grep -qs '^VERSION_ID="12"' /etc/os-release || ! grep -qs '^ID=debian' /etc/os-release; then
  info "warning: this is not Debian 12; the package names in QS_PACKAGES may not fit"
fi

# What the build (bindgen needs libclang; meson + ninja drive cargo) and the demo (libvirtd with
# its QEMU driver, virsh, QEMU, unshare, python3 for the subreaper) need: nothing else. Only
# additions, never a trailing "-" (removal): a demo must not take away what a user installed.
QS_PACKAGES=(
  clang libclang-dev pkg-config meson ninja-build
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
  util-linux python3
)

# install_deps: install the QS_PACKAGES that are missing, after saying which and asking.
install_deps() {
  local p missing=() plan bad qemu_ver inst extra=() change=()
  for p in "${QS_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    info "every package the demo needs is installed: ${QS_PACKAGES[*]}"
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Debian 12 machines often carry qemu-utils from bookworm-backports, whose version blocks
  # Debian 12's qemu-system-x86 (the QEMU libvirt 9.0 is built and tested with): the one change
  # the demo may need to make to an installed package is to bring qemu-utils to that same
  # version. It is said, and asked for, like every other change.
  if printf '%s\n' "${missing[@]}" | grep -qx qemu-system-x86; then
    qemu_ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    inst=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [ -n "$inst" ] && [ -n "$qemu_ver" ] && [ "$inst" != "$qemu_ver" ]; then
      extra=(--allow-downgrades "qemu-utils=$qemu_ver")
      change=("qemu-utils $inst -> $qemu_ver (to match qemu-system-x86 $qemu_ver)")
    fi
  fi
  info "missing: ${missing[*]}"
  info "this installs them (and what they depend on) and removes nothing"
  if [ "${#change[@]}" -ne 0 ]; then
    info "it also changes one installed package: ${change[*]}"
  fi
  if [ "$YES" != 1 ]; then
    [ -t 0 ] || die "not changing packages without asking: run with --yes, or install them yourself (apt-get install --no-install-recommends ${missing[*]}) and run with --no-deps"
    local answer
    read -r -p "    go ahead? [y/N] " answer
    case $answer in
    y | Y | yes) ;;
    *) die "nothing installed; install the packages yourself and run with --no-deps" ;;
    esac
  fi
  # A dry run first: if installing would remove anything, or downgrade anything but what was
  # said above, stop and say what.
  plan=$(apt-get install -s --no-install-recommends "${extra[@]}" "${missing[@]}" 2>&1) ||
    die "apt cannot install ${missing[*]}: $(printf '%s\n' "$plan" | tail -5)"
  bad=$(printf '%s\n' "$plan" | grep -E '^Remv ' || true)
  if [ -z "${extra[*]}" ] && printf '%s\n' "$plan" | grep -q DOWNGRADED; then
    bad="$bad$(printf '%s\n' "$plan" | sed -n '/DOWNGRADED/,/^[^ ]/p')"
  fi
  if [ -n "$bad" ]; then
    printf '%s\n' "$bad" >&2
    die "installing ${missing[*]} would remove or downgrade the packages above; nothing was changed. Install them yourself, then run with --no-deps"
  fi
  apt-get install -y -q --no-install-recommends --no-remove "${extra[@]}" "${missing[@]}"
}

if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null ||
  die "cargo not found: install Rust >= 1.85 (for example with rustup) and run this again"

if [ "$DEPS" = 1 ]; then
  say "1/4 the build and demo dependencies (Debian packages)"
  install_deps
else
  say "1/4 skipping the dependencies (--no-deps)"
fi
for cmd in meson ninja libvirtd virsh qemu-system-x86_64 unshare python3; do
  command -v "$cmd" >/dev/null || die "$cmd not found; run without --no-deps (it installs: ${QS_PACKAGES[*]})"
done

say "2/4 building and installing into $PREFIX"
mkdir -p "$QS"
if [ -f "$BUILD/build.ninja" ]; then
  meson setup --reconfigure "$BUILD" "$ROOT/meson-install" --prefix="$PREFIX" --libdir=lib >/dev/null
else
  meson setup "$BUILD" "$ROOT/meson-install" --prefix="$PREFIX" --libdir=lib >/dev/null
fi
meson compile -C "$BUILD"
meson install -C "$BUILD" --quiet
info "installed:"
(cd "$PREFIX" && find . -type f | sort | sed 's|^\./|      |')

say "3/4 the demo: a private libvirt host with lockwarden"
RUN=$(mktemp -d "$QS/run.XXXXXX")
CREATED=()
# shellcheck disable=SC2317 # called through the EXIT trap
cleanup_outside() {
  local rc=$? d
  trap - EXIT
  for d in "${CREATED[@]}"; do rmdir "$d" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then
    info "demo files kept in $RUN"
  else
    rm -rf "$RUN"
  fi
  exit "$rc"
}
trap cleanup_outside EXIT
for d in "${NS_DIRS[@]}"; do
  mkdir -p "$RUN/ns$d"
  # The mount points must exist on the host; remember the ones made here, to remove them.
  if [ ! -d "$d" ]; then
    mkdir -p "$d"
    CREATED+=("$d")
  fi
done
mkdir -p "$RUN/images" "$RUN/ns/var/log/libvirt/qemu" "$RUN/ns/var/lib/libvirt/qemu" \
  "$RUN/ns/var/cache/libvirt/qemu"
cp "$ROOT/scripts/lib/qemu-nolock.sh" "$RUN/qemu-nolock"
chmod 755 "$RUN/qemu-nolock"
info "QEMU's own image locking is switched off for the demo VMs (emulator wrapper"
info "$RUN/qemu-nolock), so the refusal you see comes from lockwarden, not from QEMU"

export PREFIX PLUGIN_DIR
rc=0
unshare -m --propagation private -- \
  python3 "$ROOT/scripts/lib/subreaper.py" bash "$0" --inside "$RUN" || rc=$?
if [ "$rc" -ne 0 ]; then
  say "the demo FAILED (exit status $rc)"
  info "logs: $RUN/ns/var/log/libvirt (kept)"
  KEEP=1
  exit "$rc"
fi

say "4/4 finished"
info "lockwarden is installed in $PREFIX (man pages: man -l $PREFIX/share/man/man8/lockwardend.8)"
info "to enable it on a real host, see README.md, \"Enabling lockwarden on a host\""
