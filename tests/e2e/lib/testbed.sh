# shellcheck shell=bash
# The e2e testbed: two libvirt "hosts" (A and B) on one machine, each a private mount namespace
# (and UTS namespace: host names lw-e2e-a, lw-e2e-b) with its own libvirtd and its own lock daemon (lockwardend and/or virtlockd), sharing one image
# directory. Sourced by tests/e2e/run.sh, which sets:
#   W          work directory (everything the suite creates lives below it)
#   IMG        the shared image directory ($W/images, same path in both namespaces)
#   E2E_DIR    tests/e2e (templates)
#   LW_SO      lockwarden plugin to test (copied to $W/plugins/lockwarden.so)
#   LW_DAEMON  lockwardend binary to test (copied to $W/bin/lockwardend)
#
# Layout of host H (seen from outside its namespace; bind-mounted inside it over the system path):
#   $W/H/etc   -> /etc/libvirt        (a copy of the stock /etc/libvirt plus our configs)
#   $W/H/run   -> /run/libvirt        (libvirt-sock, virtlockd-sock, qemu/*.pid ...)
#   $W/H/lib   -> /var/lib/libvirt
#   $W/H/cache -> /var/cache/libvirt
#   $W/H/log   -> /var/log/libvirt    (libvirtd.log, qemu/NAME.log, daemon output)
#   $W/H/lw    -> /run/lockwarden     (lockwardend sockets and pid file)

# bash 5.2: an unquoted & in the replacement of ${var//pattern/replacement} would mean "the
# match"; XML escaping and the template filling want a literal &.
shopt -u patsub_replacement 2>/dev/null || true

HOSTS=(A B)
declare -A ANCHOR=() LIBVIRTD_PID=() LOCKD_PID=() LWD_PID=() LM=() RECONFIGURED=()
declare -A HOST_UUID=([A]=3f0c2a4e-5d6b-4c7d-8e9f-a0b1c2d3e4a1 [B]=3f0c2a4e-5d6b-4c7d-8e9f-a0b1c2d3e4b2)
# System directories replaced per host, and the host-dir subdirectory that replaces each.
NS_MOUNTS=(/etc/libvirt:etc /run/libvirt:run /var/lib/libvirt:lib /var/cache/libvirt:cache
  /var/log/libvirt:log /run/lockwarden:lw)
CREATED_MOUNTPOINTS=()
VIRSH_TIMEOUT=${LW_E2E_VIRSH_TIMEOUT:-60}

log() { printf '# %s\n' "$*" >&2; }
die() {
  printf 'e2e: %s\n' "$*" >&2
  exit 1
}

now_ms() { date +%s%3N; }
# since T0_MS: elapsed time as "1.234 s"
since() {
  local d=$(($(now_ms) - $1))
  printf '%d.%03d s' $((d / 1000)) $((d % 1000))
}

# host_name HOST: the host name each namespace gets (a UTS namespace of its own), so that
# messages naming a host tell the two apart.
host_name() { printf 'lw-e2e-%s' "${1,,}"; }

hostdir() { printf '%s/%s' "$W" "$1"; }
uri() { printf 'qemu:///system?socket=%s/%s/run/libvirt-sock' "$W" "$1"; }

# vsh HOST ARGS...: virsh against one host, bounded in time so a hung lock manager cannot hang
# the suite.
vsh() {
  local h=$1
  shift
  timeout --kill-after=5 "$VIRSH_TIMEOUT" virsh -q -c "$(uri "$h")" "$@"
}

# in_ns HOST CMD...: run CMD inside HOST's mount namespace. Background daemons are started with
# a literal `nsenter ... &` instead (nsenter execs, so $! is then the daemon's own pid; a
# function run with & would be a subshell whose pid is not the daemon's).
in_ns() {
  local h=$1
  shift
  nsenter -t "${ANCHOR[$h]}" -m -u -- "$@"
}

# wait_until TIMEOUT_SECONDS CMD...: poll CMD every 50 ms until it succeeds.
wait_until() {
  local deadline=$((SECONDS + $1)) 
  shift
  until "$@"; do
    ((SECONDS >= deadline)) && return 1
    sleep 0.05
  done
}

pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
# stop_pid PID [GRACE_SECONDS]: SIGTERM, then SIGKILL after the grace period; reaps our children.
stop_pid() {
  local pid=$1 grace=${2:-10}
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null
  wait_until "$grace" eval "! kill -0 $pid 2>/dev/null" || kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}

# file_id PATH: inode and change time (ns) of PATH, "none" if missing. A socket recreated by a
# restarted daemon may reuse the inode number, but not also the ctime.
file_id() { stat -c '%i %z' "$1" 2>/dev/null || echo none; }

# ---------------------------------------------------------------------------------------------
# Host configuration

# write_qemu_conf HOST: qemu.conf for the lock manager currently chosen in LM[HOST].
write_qemu_conf() {
  local h=$1 d
  d=$(hostdir "$h")
  cat >"$d/etc/qemu.conf" <<EOF
# e2e host $h (written by tests/e2e/lib/testbed.sh)
lock_manager = "${LM[$h]}"
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
}

# write_plugin_confs HOST [LOCKSPACE_DIR]: qemu-lockwarden.conf and qemu-lockd.conf, direct mode
# unless a file lockspace directory is given.
write_plugin_confs() {
  local h=$1 ls=${2:-} d
  d=$(hostdir "$h")
  {
    echo "# e2e host $h"
    echo 'daemon_socket = "/run/lockwarden/lockwardend.sock"'
    [ -n "$ls" ] && echo "file_lockspace_dir = \"$ls\""
  } >"$d/etc/qemu-lockwarden.conf"
  {
    echo "# e2e host $h"
    [ -n "$ls" ] && echo "file_lockspace_dir = \"$ls\""
  } >"$d/etc/qemu-lockd.conf"
  true
}

host_prepare() {
  local h=$1 d sub
  d=$(hostdir "$h")
  for m in "${NS_MOUNTS[@]}"; do
    sub=${m#*:}
    mkdir -p "$d/$sub"
  done
  cp -a /etc/libvirt/. "$d/etc/"
  # Only the stock configuration: no domains this machine may have defined, nothing
  # autostarted (no networks: this host has no bridges or dnsmasq to offer).
  rm -rf "$d/etc/qemu/networks/autostart" "$d/etc/qemu/autostart" "$d/etc/storage/autostart"
  rm -f "$d/etc/qemu/"*.xml
  mkdir -p "$d/lib/qemu" "$d/log/qemu" "$d/cache/qemu"
  cat >"$d/etc/libvirtd.conf" <<EOF
# e2e host $h (written by tests/e2e/lib/testbed.sh)
auth_unix_ro = "none"
auth_unix_rw = "none"
host_uuid = "${HOST_UUID[$h]}"
log_filters = "1:locking 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
EOF
  cat >"$d/etc/lockwardend.conf" <<EOF
# e2e host $h
log_level = "debug"
# <lease> lock files may only live under lease_dir (docs/hardening.md).
lease_dir = "$IMG/leases"
EOF
  write_qemu_conf "$h"
  write_plugin_confs "$h"
}

# host_ns_start HOST: the namespace anchor (a sleeping process holding the private mounts).
host_ns_start() {
  local h=$1 d m sys sub
  d=$(hostdir "$h")
  # shellcheck disable=SC2016 # expanded by the inner bash
  local script='set -e; d=$1; hostname "$2"; shift 2
    for m in "$@"; do mount --bind "$d/${m#*:}" "${m%%:*}"; done
    : >"$d/ns-ready"
    exec sleep 2147483647'
  unshare -m -u --propagation private -- bash -c "$script" "anchor-$h" "$d" "$(host_name "$h")" "${NS_MOUNTS[@]}" \
    </dev/null >"$d/anchor.log" 2>&1 &
  ANCHOR[$h]=$!
  wait_until 10 test -e "$d/ns-ready" ||
    die "host $h: mount namespace setup failed: $(cat "$d/anchor.log")"
  # Sanity: inside, /run/libvirt is this host's run dir; outside it is not.
  for m in "${NS_MOUNTS[@]}"; do
    sys=${m%%:*}
    sub=${m#*:}
    [ "$(in_ns "$h" stat -c %d:%i "$sys")" = "$(stat -c %d:%i "$d/$sub")" ] ||
      die "host $h: $sys is not bind-mounted from $d/$sub inside the namespace"
  done
}

start_virtlockd() {
  local h=$1 d old
  d=$(hostdir "$h")
  old=$(file_id "$d/run/virtlockd-sock")
  nsenter -t "${ANCHOR[$h]}" -m -u -- virtlockd -p /run/libvirt/virtlockd.pid </dev/null >>"$d/log/virtlockd.out" 2>&1 &
  LOCKD_PID[$h]=$!
  wait_until 10 eval "[ \"\$(file_id '$d/run/virtlockd-sock')\" != '$old' ]" ||
    die "host $h: virtlockd did not create its socket: $(tail -5 "$d/log/virtlockd.out")"
}

start_lockwardend() {
  local h=$1 d old
  d=$(hostdir "$h")
  old=$(file_id "$d/lw/lockwardend.sock")
  nsenter -t "${ANCHOR[$h]}" -m -u -- "$W/bin/lockwardend" --config /etc/libvirt/lockwardend.conf \
    --socket /run/lockwarden/lockwardend.sock \
    --admin-socket /run/lockwarden/lockwardend-admin.sock \
    --pid-file /run/lockwarden/lockwardend.pid --verbose \
    </dev/null >>"$d/log/lockwardend.log" 2>&1 &
  LWD_PID[$h]=$!
  if ! wait_until 10 eval "[ \"\$(file_id '$d/lw/lockwardend.sock')\" != '$old' ]" ||
    ! pid_alive "${LWD_PID[$h]}"; then
    echo "host $h: lockwardend did not come up: $(tail -5 "$d/log/lockwardend.log")" >&2
    return 1
  fi
}

start_libvirtd() {
  local h=$1 d pid
  d=$(hostdir "$h")
  nsenter -t "${ANCHOR[$h]}" -m -u -- env LIBVIRT_LOCK_MANAGER_PLUGIN_DIR="$W/plugins" \
    libvirtd -p /run/libvirt/libvirtd.pid </dev/null >>"$d/log/libvirtd.out" 2>&1 &
  pid=$!
  LIBVIRTD_PID[$h]=$pid
  local deadline=$((SECONDS + 60))
  until vsh "$h" uri >/dev/null 2>&1; do
    if ! pid_alive "$pid"; then
      echo "host $h: libvirtd (lock_manager=${LM[$h]}) exited during start-up; log tail:" >&2
      grep -E 'error|Initialization' "$d/log/libvirtd.log" | tail -8 | sed 's/^/#   /' >&2
      tail -3 "$d/log/libvirtd.out" | sed 's/^/#   /' >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "host $h: libvirtd did not answer on $(uri "$h") within 60 s" >&2
      return 1
    fi
    sleep 0.1
  done
}

stop_libvirtd() {
  local h=$1
  stop_pid "${LIBVIRTD_PID[$h]:-}" 15
  LIBVIRTD_PID[$h]=
}

# restart_libvirtd HOST: SIGTERM and start again (running QEMUs are left alone and reconnected).
restart_libvirtd() {
  stop_libvirtd "$1"
  start_libvirtd "$1"
}

# host_up HOST LOCK_MANAGER: configure and start a host from scratch.
host_up() {
  local h=$1
  LM[$h]=$2
  host_prepare "$h"
  host_ns_start "$h"
  start_virtlockd "$h" # always: scenario 13 and the lockd baseline need it; cheap otherwise
  if [ "${LM[$h]}" = lockwarden ]; then start_lockwardend "$h" || return 1; fi
  start_libvirtd "$h"
}

# set_lock_manager HOST NAME [LOCKSPACE_DIR]: switch a running host (all its VMs must be gone).
set_lock_manager() {
  local h=$1
  LM[$h]=$2
  RECONFIGURED[$h]=${3:-}
  [ "$2" = "$MODE" ] || RECONFIGURED[$h]=1
  write_qemu_conf "$h"
  write_plugin_confs "$h" "${3:-}"
  if [ "$2" = lockwarden ] && ! pid_alive "${LWD_PID[$h]:-}"; then start_lockwardend "$h" || return 1; fi
  if [ "$2" = lockd ] && ! pid_alive "${LOCKD_PID[$h]:-}"; then start_virtlockd "$h"; fi
  restart_libvirtd "$h"
}

# qemu_pid HOST DOMAIN: the pid libvirt recorded for the domain's QEMU.
qemu_pid() { cat "$(hostdir "$1")/run/qemu/$2.pid" 2>/dev/null; }

# clean_domains HOST: destroy and undefine every domain (and managed-save image) of a host.
clean_domains() {
  local h=$1 dom
  pid_alive "${LIBVIRTD_PID[$h]:-}" || return 0
  while read -r dom; do
    [ -n "$dom" ] || continue
    vsh "$h" destroy "$dom" >/dev/null 2>&1
    vsh "$h" managedsave-remove "$dom" >/dev/null 2>&1
    vsh "$h" undefine "$dom" >/dev/null 2>&1
  done < <(vsh "$h" list --all --name 2>/dev/null)
}

testbed_teardown() {
  local h pid f
  for h in "${HOSTS[@]}"; do
    [ -n "${ANCHOR[$h]:-}" ] || continue
    clean_domains "$h"
    stop_pid "${LIBVIRTD_PID[$h]:-}" 10
    for f in "$(hostdir "$h")"/run/qemu/*.pid; do
      [ -e "$f" ] || continue
      pid=$(cat "$f" 2>/dev/null) && [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
    done
    stop_pid "${LWD_PID[$h]:-}" 5
    stop_pid "${LOCKD_PID[$h]:-}" 5
    stop_pid "${ANCHOR[$h]}" 2
    ANCHOR[$h]=
  done
  for f in "${CREATED_MOUNTPOINTS[@]}"; do rmdir "$f" 2>/dev/null; done
  true
}

# Mount points must exist outside the namespaces too; remember the ones we create.
ensure_mountpoints() {
  local m sys
  for m in "${NS_MOUNTS[@]}"; do
    sys=${m%%:*}
    if [ ! -d "$sys" ]; then
      mkdir -p "$sys"
      CREATED_MOUNTPOINTS+=("$sys")
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# Images and domains

# mkimg NAME FORMAT: create $IMG/NAME.FORMAT (qcow2 16 MiB or raw 1 MiB) and print its path.
mkimg() {
  local p="$IMG/$1.$2" size=16M
  [ "$2" = raw ] && size=1M
  [ -e "$p" ] || qemu-img create -q -f "$2" "$p" "$size" || return 1
  printf '%s' "$p"
}

# xml_escape TEXT: TEXT as an XML attribute value.
xml_escape() {
  local t=${1//&/&amp;}
  t=${t//</&lt;}
  t=${t//>/&gt;}
  t=${t//\'/&apos;}
  printf '%s' "${t//\"/&quot;}"
}

# disk_xml SPEC INDEX: one <disk> for SPEC = KIND:PATH with KIND one of
#   rw (qcow2, virtio), raw (raw, virtio), shared (raw, virtio, <shareable/>),
#   ro (qcow2, virtio, <readonly/>), cdrom (raw, IDE CD-ROM hdc), scsi (qcow2, virtio-scsi)
disk_xml() {
  local kind=${1%%:*} path=${1#*:} letters=abcdefghijklmnopqrstuvwxyz
  local letter=${letters:$2:1} fmt=qcow2 extra='' type=disk bus=virtio
  local dev=vd$letter
  case $kind in
  rw) ;;
  raw) fmt=raw ;;
  shared) fmt=raw extra='<shareable/>' ;;
  ro) extra='<readonly/>' ;;
  cdrom) fmt=raw type=cdrom bus=ide dev=hdc extra='<readonly/>' ;;
  scsi) bus=scsi dev=sd$letter ;;
  *) die "disk_xml: unknown disk kind $kind" ;;
  esac
  printf "    <disk type='file' device='%s'><driver name='qemu' type='%s'/><source file='%s'/><target dev='%s' bus='%s'/>%s</disk>\n" \
    "$type" "$fmt" "$(xml_escape "$path")" "$dev" "$bus" "$extra"
}

# mkdom NAME DISKSPEC...: write $W/xml/NAME.xml and print its path.
mkdom() {
  local name=$1 i=0 disks='' spec out
  shift
  for spec in "$@"; do
    disks+=$(disk_xml "$spec" "$i")$'\n'
    i=$((i + 1))
  done
  out="$W/xml/$name.xml"
  local tmpl
  tmpl=$(<"$E2E_DIR/domain.xml.in")
  tmpl=${tmpl//@NAME@/$name}
  tmpl=${tmpl//@UUID@/$(cat /proc/sys/kernel/random/uuid)}
  tmpl=${tmpl//@EMULATOR@/$W/bin/qemu-nolock}
  tmpl=${tmpl//@DISKS@/${disks%$'\n'}}
  printf '%s\n' "$tmpl" >"$out"
  printf '%s' "$out"
}

# ---------------------------------------------------------------------------------------------
# The admin CLI inside a host (issue 20: audit / adopt)

# lw HOST ARGS...: run `lockwarden ARGS` inside HOST's namespace with the host's plugin config;
# its output (stdout and stderr) is left in LW_OUT, its exit status in LW_RC.
LW_OUT='' LW_RC=0
lw() {
  local h=$1
  shift
  LW_OUT=$(in_ns "$h" timeout --kill-after=5 "$VIRSH_TIMEOUT" "$LW_CLI" "$@" \
    --config /etc/libvirt/qemu-lockwarden.conf 2>&1)
  LW_RC=$?
}
