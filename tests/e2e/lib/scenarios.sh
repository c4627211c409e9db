# shellcheck shell=bash
# The e2e scenarios (issue 3). Sourced by tests/e2e/run.sh after lib/testbed.sh.
#
# Each scenario is a function s<N> that returns
#   0 = PASS, 1 = FAIL (EVIDENCE says why, quoting virsh), 2 = INFO (documents behaviour),
#   3 = SKIP (does not apply to the lock manager under test; EVIDENCE says why).
# Checks print '#' detail lines; refusals are quoted verbatim so the output shows what an
# operator would see. After every scenario all domains on both hosts are destroyed.

PASSED=0 FAILED=0
EVIDENCE=''
LAST_ERR=''

fail() {
  EVIDENCE=$*
  return 1
}
detail() { printf '#   %s\n' "$*"; }
# oneline TEXT: virsh output on one line ("error: a / error: b"), without virsh's generic
# "Failed to create domain from FILE" preamble.
oneline() {
  grep -v -e '^error: Failed to create domain from' -e '^$' <<<"$1" | paste -sd'|' - | sed 's/|/ \/ /g'
}
# MODE (lockwarden|lockd) is set by run.sh.
lockwarden_mode() { [ "$MODE" = lockwarden ]; }

# A refusal must come from the lock manager: QEMU's own image locking is switched off by the
# emulator wrapper, so a QEMU lock error means the wrapper failed and the lock manager was never
# asked.
qemu_lock_error() { grep -q -e 'Failed to get "write" lock' -e 'Failed to get "consistent read" lock' -e 'Failed to get shared "write" lock' <<<"$1"; }

# start_ok HOST NAME DISKSPEC...: create a transient domain; it must end up running.
start_ok() {
  local h=$1 name=$2 xml out
  shift 2
  xml=$(mkdom "$name" "$@")
  if ! out=$(vsh "$h" create "$xml" 2>&1); then
    if qemu_lock_error "$out"; then
      fail "host $h: QEMU's own image locking refused $name (the emulator wrapper did not switch it off): $(oneline "$out")"
    else
      fail "host $h: starting $name on $* failed: $(oneline "$out")"
    fi
    return 1
  fi
  expect_state "$h" "$name" running
}

# start_refused HOST NAME DISKSPEC...: creating the domain must fail with a lock conflict
# ("resource busy", libvirt's code 87) and leave no domain behind. The error is kept in LAST_ERR.
start_refused() {
  local h=$1 name=$2 xml out
  shift 2
  xml=$(mkdom "$name" "$@")
  if out=$(vsh "$h" create "$xml" 2>&1); then
    fail "host $h: $name started on $* although the disk is held elsewhere"
    return 1
  fi
  LAST_ERR=$(oneline "$out")
  refusal_is_lock_conflict "$h" "$name" || return 1
  if vsh "$h" domstate "$name" >/dev/null 2>&1; then
    fail "host $h: refused domain $name still exists ($(vsh "$h" domstate "$name" 2>&1))"
    return 1
  fi
  detail "host $h refused $name: $LAST_ERR"
}

refusal_is_lock_conflict() {
  local h=$1 what=$2
  if qemu_lock_error "$LAST_ERR"; then
    fail "host $h: $what was refused by QEMU's own image locking, not by the lock manager: $LAST_ERR"
    return 1
  fi
  if ! grep -q 'resource busy' <<<"$LAST_ERR"; then
    fail "host $h: $what failed, but not with a lock conflict: $LAST_ERR"
    return 1
  fi
}

# err_mentions TEXT...: the last refusal names each TEXT (disk path, holder VM ...).
err_mentions() {
  local t
  for t in "$@"; do
    grep -qF -- "$t" <<<"$LAST_ERR" || {
      fail "the refusal does not name '$t': $LAST_ERR"
      return 1
    }
  done
}

expect_state() {
  local h=$1 name=$2 want=$3 got
  got=$(vsh "$h" domstate "$name" 2>&1)
  [ "$got" = "$want" ] || fail "host $h: $name is '$(oneline "$got")', expected '$want'"
}

# has HOST TEXT [-E] VIRSH-ARGS...: the output of a virsh command contains TEXT (fixed string, or
# an extended regex with -E). Not "virsh | grep -q": with pipefail, grep's early exit would make
# virsh die of SIGPIPE and the pipeline fail.
has() {
  local h=$1 text=$2 mode=-F out
  shift 2
  if [ "${1:-}" = -E ]; then
    mode=-E
    shift
  fi
  out=$(vsh "$h" "$@" 2>&1)
  grep -q "$mode" -- "$text" <<<"$out"
}

# gone HOST NAME: the domain no longer exists (transient) on HOST.
gone() { ! vsh "$1" domstate "$2" >/dev/null 2>&1; }

destroy() {
  local out
  out=$(vsh "$1" destroy "$2" 2>&1) || fail "host $1: virsh destroy $2 failed: $(oneline "$out")"
}

# virsh_ok HOST ARGS...: a virsh command that must succeed.
virsh_ok() {
  local h=$1 out
  shift
  out=$(vsh "$h" "$@" 2>&1) || {
    if qemu_lock_error "$out"; then
      fail "host $h: QEMU's own image locking refused 'virsh $*': $(oneline "$out")"
    else
      fail "host $h: 'virsh $*' failed: $(oneline "$out")"
    fi
    return 1
  }
}

# virsh_refused HOST ARGS...: a virsh command that must fail with a lock conflict.
virsh_refused() {
  local h=$1 out
  shift
  if out=$(vsh "$h" "$@" 2>&1); then
    fail "host $h: 'virsh $*' succeeded although the disk is held elsewhere"
    return 1
  fi
  LAST_ERR=$(oneline "$out")
  refusal_is_lock_conflict "$h" "'virsh $*'" || return 1
  detail "host $h refused 'virsh $*': $LAST_ERR"
}

# lock_calls_since HOST OFFSET: the plugin entry points libvirtd called (as logged by its
# lock_manager.c with log_filters 1:locking) since byte OFFSET of its log. The forked child's
# REGISTER_ONLY Acquire at domain start is not logged there.
log_size() { stat -c %s "$(hostdir "$1")/log/libvirtd.log"; }
lock_calls_since() {
  tail -c +"$(($2 + 1))" "$(hostdir "$1")/log/libvirtd.log" |
    grep -oE ' : virLockManager(Acquire|Release|Inquire|AddResource):[0-9]+ ' |
    sed -E 's/ : virLockManager([A-Za-z]+):.*/\1/' | sort | uniq -c |
    awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}'
}

# acquire_ms_since HOST OFFSET: how long the first Acquire libvirtd logged after byte OFFSET took
# (from libvirt's "virLockManagerAcquire" debug line to the "virLockManagerFree" of the same
# lock object; millisecond timestamps).
acquire_ms_since() {
  tail -c +"$(($2 + 1))" "$(hostdir "$1")/log/libvirtd.log" | awk '
    function ms(t,  a) { split(t, a, /[:.+]/); return ((a[1] * 60 + a[2]) * 60 + a[3]) * 1000 + a[4] }
    / : virLockManagerAcquire:[0-9]+ : / && !lock { match($0, /lock=0x[0-9a-f]+/); lock = substr($0, RSTART, RLENGTH); t0 = ms($2); next }
    lock && / : virLockManagerFree:[0-9]+ : / && index($0, lock) { print ms($2) - t0 " ms"; exit }'
}

# ---------------------------------------------------------------------------------------------

s1() {
  local d
  d=$(mkimg s1 qcow2)
  start_ok A s1-a "rw:$d" || return 1
  # Testbed self-check: the emulator wrapper switched QEMU's own image locking off.
  grep -q '"locking":"off"' <(tr '\0' '\n' <"/proc/$(qemu_pid A s1-a)/cmdline") ||
    fail "the QEMU of s1-a runs without \"locking\":\"off\": the emulator wrapper is not in effect" || return 1
  start_refused A s1-b "rw:$d" || return 1
  err_mentions "$d" || return 1
  if lockwarden_mode; then err_mentions s1-a || return 1; fi
  expect_state A s1-a running
}

s2() {
  local d
  d=$(mkimg "s2 Bob's disk & <more>" qcow2) # a path that needs quoting everywhere
  start_ok A s2-a "rw:$d" || return 1
  start_refused B s2-b "rw:$d" || return 1
  err_mentions "$d" || return 1
  if lockwarden_mode; then
    # The refusal on host B names host A's VM, its host and the mode (holder records).
    err_mentions "VM 's2-a'" "on host lw-e2e-a" "(exclusive)" || return 1
    # `lockwarden who` run on host B names host A's VM, from the shared storage alone.
    local who
    if ! who=$(in_ns B "$LW_CLI" who "$d" --config /etc/libvirt/qemu-lockwarden.conf 2>&1); then
      fail "host B: lockwarden who \"$d\" failed: $(oneline "$who")"
      return 1
    fi
    detail "host B: lockwarden who: $(oneline "$who")"
    grep -q 'lw-e2e-a' <<<"$who" && grep -q 's2-a' <<<"$who" ||
      fail "host B: lockwarden who does not name host A's VM s2-a on lw-e2e-a: $(oneline "$who")" || return 1
  fi
  expect_state A s2-a running
}

s3() {
  local s
  s=$(mkimg s3-shared raw)
  start_ok A s3-a "shared:$s" || return 1
  start_ok B s3-b "shared:$s" || return 1
  start_refused A s3-c "raw:$s" || return 1
  start_refused B s3-d "raw:$s" || return 1
  expect_state A s3-a running && expect_state B s3-b running
}

s4() {
  local r
  r=$(mkimg s4-ro qcow2)
  start_ok A s4-a "ro:$r" || return 1
  start_ok B s4-b "ro:$r" || return 1
  if ! lockwarden_mode; then
    if start_ok B s4-w "rw:$r"; then
      EVIDENCE="lockd does not lock read-only disks: a writer started next to two readers (lockwarden's readonly_disks=\"shared\" refuses it)"
    else
      EVIDENCE="lockd: writer next to readers: $EVIDENCE"
    fi
    return 3
  fi
  start_refused B s4-w "rw:$r" || return 1
  err_mentions "$r" || return 1
  start_refused A s4-x "rw:$r" || return 1
  expect_state A s4-a running && expect_state B s4-b running
}

s5() {
  local d pid
  d=$(mkimg s5 qcow2)
  start_ok A s5-a "rw:$d" || return 1
  start_refused B s5-b "rw:$d" || return 1
  destroy A s5-a || return 1
  start_ok B s5-b "rw:$d" || return 1
  detail "after 'virsh destroy' on A, B started s5-b"
  pid=$(qemu_pid B s5-b)
  [ -n "$pid" ] || fail "host B: no pid file for s5-b" || return 1
  kill -KILL "$pid"
  wait_until 10 gone B s5-b || fail "host B: libvirt did not notice that QEMU $pid of s5-b was killed" || return 1
  start_ok A s5-c "rw:$d" || return 1
  detail "after SIGKILL of s5-b's QEMU (pid $pid) on B, A started s5-c"
  start_refused B s5-d "rw:$d"
}

s6() {
  local m=() specs=() i f off loff
  for i in 1 2 3 4 5 6 7 8; do
    m[i]=$(mkimg "s6-m$i" qcow2)
    specs+=("rw:${m[i]}")
  done
  f=$(mkimg s6-free qcow2)
  off=$(log_size A)
  loff=$(file_size "$(hostdir A)/log/lockwardend.log")
  start_ok A s6-a "${specs[@]}" || return 1
  detail "the 8-disk Acquire took $(acquire_ms_since A "$off") (libvirt's Acquire to Free)"
  if lockwarden_mode; then
    detail "lockwardend A saw $(tail -c +"$((loff + 1))" "$(hostdir A)/log/lockwardend.log" | grep -c ' connected: ') connection(s) for this start (the lifetime handle + one per plugin call)"
  fi
  start_refused B s6-b "rw:$f" "rw:${m[5]}" || return 1
  err_mentions "${m[5]}" || return 1
  # The refused start must not leave the free disk locked.
  start_ok B s6-c "rw:$f" || return 1
  detail "the free disk was left unlocked: s6-c started on it on B"
  # The 8-disk VM holds all its disks (first and last checked on top of the 5th).
  start_refused B s6-d "rw:${m[1]}" || return 1
  start_refused B s6-e "rw:${m[8]}" || return 1
  expect_state A s6-a running
}

s7() {
  local d pid
  d=$(mkimg s7 qcow2)
  start_ok A s7-a "rw:$d" || return 1
  pid=$(qemu_pid A s7-a)
  restart_libvirtd A || fail "host A: libvirtd did not come back after a restart" || return 1
  detail "libvirtd on A restarted (lock daemon left alone)"
  expect_state A s7-a running || return 1
  [ "$(qemu_pid A s7-a)" = "$pid" ] || fail "host A: s7-a has a new QEMU pid after the libvirtd restart" || return 1
  start_refused B s7-b "rw:$d" || return 1
  start_refused A s7-c "rw:$d" || return 1
  # The lease still goes with the VM when the restarted libvirtd destroys it.
  destroy A s7-a || return 1
  start_ok B s7-d "rw:$d"
}

s8() {
  local d off calls warn
  d=$(mkimg s8 qcow2)
  start_ok A s8-a "rw:$d" || return 1
  off=$(log_size A)
  virsh_ok A suspend s8-a || return 1
  sleep 0.3 # let the STOP event handler run (it releases too)
  calls=$(lock_calls_since A "$off")
  detail "lock-manager calls logged by libvirtd A for 'virsh suspend': ${calls:-none}"
  # libvirt 9.0 releases twice on suspend (STOP event handler, then qemuProcessStopCPUs); a
  # failing second Release only shows as a warning in libvirtd's log.
  warn=$(tail -c +"$((off + 1))" "$(hostdir A)/log/libvirtd.log" | grep -E 'Unable to release lease|is not locked' | sed -E 's/^.* : //' | paste -sd'|' -)
  if [ -n "$warn" ]; then
    lockwarden_mode && fail "host A: libvirtd logged a failed Release on suspend: $warn" && return 1
    detail "libvirtd A logged for the second Release: $warn"
  fi
  expect_state A s8-a paused || return 1
  start_ok B s8-b "rw:$d" || return 1
  detail "while s8-a is suspended, B started s8-b on its disk"
  virsh_refused A resume s8-a || return 1
  err_mentions "$d" || return 1
  expect_state A s8-a paused || return 1
  destroy B s8-b || return 1
  off=$(log_size A)
  virsh_ok A resume s8-a || return 1
  detail "lock-manager calls for 'virsh resume': $(lock_calls_since A "$off")"
  expect_state A s8-a running || return 1
  start_refused B s8-c "rw:$d"
}

s9() {
  local d h1 h2 iso1 iso2 out off
  d=$(mkimg s9 qcow2)
  h1=$(mkimg s9-held qcow2)
  h2=$(mkimg s9-free qcow2)
  iso1=$(mkimg s9-cd1 raw)
  iso2=$(mkimg s9-cd2 raw)
  start_ok B s9-holder "rw:$h1" || return 1
  start_ok A s9-a "rw:$d" "cdrom:$iso1" || return 1
  # Hot-plug on the virtio-scsi bus: its unplug needs no guest cooperation (there is no OS).
  off=$(log_size A)
  virsh_refused A attach-disk s9-a "$h1" sda --targetbus scsi --subdriver qcow2 || return 1
  detail "lock-manager calls for the refused attach-disk: $(lock_calls_since A "$off")"
  err_mentions "$h1" || return 1
  out=$(vsh A domblklist s9-a 2>&1)
  if grep -qF "$h1" <<<"$out"; then fail "host A: the refused disk is attached anyway: $(oneline "$out")"; return 1; fi
  off=$(log_size A)
  virsh_ok A attach-disk s9-a "$h2" sdb --targetbus scsi --subdriver qcow2 || return 1
  detail "lock-manager calls for attach-disk: $(lock_calls_since A "$off")"
  detail "hot-plug of a free disk succeeded"
  start_refused B s9-b "rw:$h2" || return 1
  off=$(log_size A)
  virsh_ok A detach-disk s9-a sdb || return 1
  wait_until 5 eval "! has A '$h2' domblklist s9-a" || fail "host A: $h2 still attached after detach-disk" || return 1
  detail "lock-manager calls for detach-disk: $(lock_calls_since A "$off")"
  start_ok B s9-c "rw:$h2" || return 1
  detail "after detach-disk, B started s9-c on the unplugged disk"
  destroy B s9-c || return 1
  # CD-ROM media change: the lease moves from the old medium to the new one.
  if lockwarden_mode; then
    start_refused B s9-w1 "raw:$iso1" || return 1
  fi
  off=$(log_size A)
  virsh_ok A change-media s9-a hdc "$iso2" --update || return 1
  detail "lock-manager calls for change-media: $(lock_calls_since A "$off")"
  has A "$iso2" domblklist s9-a || fail "host A: change-media did not insert $iso2" || return 1
  start_ok B s9-w2 "raw:$iso1" || return 1
  detail "after change-media, the old medium is free (B started a writer on it)"
  if ! lockwarden_mode; then
    EVIDENCE="hot-plug/unplug as expected; lockd does not lock read-only media, so the CD-ROM lease swap cannot be checked"
    return 3
  fi
  start_refused B s9-w3 "raw:$iso2" || return 1
  expect_state A s9-a running
}

s10() {
  local d xml off
  d=$(mkimg s10 qcow2)
  xml=$(mkdom s10-a "rw:$d")
  virsh_ok A define "$xml" || return 1
  virsh_ok A start s10-a || return 1
  start_refused B s10-b "rw:$d" || return 1
  off=$(log_size A)
  virsh_ok A managedsave s10-a || return 1
  detail "lock-manager calls for 'virsh managedsave': $(lock_calls_since A "$off")"
  expect_state A s10-a "shut off" || return 1
  has A 'Managed save: *yes' -E dominfo s10-a ||
    fail "host A: no managed save image for s10-a: $(vsh A dominfo s10-a 2>&1 | paste -sd' ')" || return 1
  detail "s10-a managed-saved"
  # Saved, the VM runs nowhere and holds nothing (libvirt's model); B may use the disk, and
  # then restoring s10-a on A must be refused.
  start_ok B s10-c "rw:$d" || return 1
  virsh_refused A start s10-a || return 1
  err_mentions "$d" || return 1
  has A 'Managed save: *yes' -E dominfo s10-a ||
    fail "host A: the refused restore lost s10-a's managed save image" || return 1
  destroy B s10-c || return 1
  virsh_ok A start s10-a || return 1
  expect_state A s10-a running || return 1
  has A 'Managed save: *no' -E dominfo s10-a || fail "host A: s10-a was not restored from its managed save image" || return 1
  detail "s10-a restored from its managed save image"
  start_refused B s10-d "rw:$d"
}

s11() {
  local d out t0 offa offb
  d=$(mkimg s11 qcow2)
  start_ok A s11-a "rw:$d" || return 1
  offa=$(log_size A)
  offb=$(log_size B)
  t0=$(now_ms)
  if ! out=$(vsh A migrate --live --unsafe s11-a "$(uri B)" --migrateuri tcp://127.0.0.1:49152 2>&1); then
    fail "live migration A -> B failed: $(oneline "$out")"
    return 1
  fi
  detail "virsh migrate --live A -> B took $(since "$t0") (--unsafe: libvirt calls a local filesystem unshared storage, 'Migration without shared storage is unsafe'; here both hosts see the same directory)"
  sleep 0.3 # the source's STOP event handler releases asynchronously
  detail "lock-manager calls during the migration: source A: $(lock_calls_since A "$offa"); destination B: $(lock_calls_since B "$offb")"
  expect_state B s11-a running || return 1
  gone A s11-a || fail "host A: s11-a still exists after the migration ($(vsh A domstate s11-a 2>&1))" || return 1
  start_refused A s11-b "rw:$d" || return 1
  start_refused B s11-c "rw:$d"
}

# try_start HOST NAME DISK [KIND]: start a probe VM on DISK (a disk_xml kind, default rw) and
# describe the outcome in one phrase: "COULD start", or "was refused (ERROR)" (the probe is
# destroyed again at once).
try_start() {
  local x out
  x=$(mkdom "$2" "${4:-rw}:$3")
  if out=$(vsh "$1" create "$x" 2>&1); then
    vsh "$1" destroy "$2" >/dev/null 2>&1
    echo "host $1 COULD start a VM on the disk"
  else
    echo "host $1 was refused ($(oneline "$out"))"
  fi
}

# s12: SIGKILL of lockwardend while a VM runs must not open any window (issue 6): QEMU keeps
# running, the other host stays refused throughout the outage and after the restart, a VM that
# ends during the outage frees its disk, and the restarted daemon still ties the lease to the VM
# (suspend/resume works, destroy frees the disk).
must_refuse() { # HOST NAME DISK WHEN
  local r
  r=$(try_start "$1" "$2" "$3")
  detail "$4: $r"
  [[ $r == *"was refused"* ]] || fail "$4: $r" || return 1
}
must_start() { # HOST NAME DISK WHEN
  local r
  r=$(try_start "$1" "$2" "$3")
  detail "$4: $r"
  [[ $r == *"COULD start"* ]] || fail "$4: expected the disk to be free: $r" || return 1
}
s12() {
  local d d2 pid pid2 lpid out err_name
  lockwarden_mode || {
    EVIDENCE="only meaningful for lockwardend"
    return 3
  }
  d=$(mkimg s12 qcow2)
  d2=$(mkimg s12-outage qcow2)
  start_ok A s12-a "rw:$d" || return 1
  start_ok A s12-f "rw:$d2" || return 1
  pid=$(qemu_pid A s12-a)
  pid2=$(qemu_pid A s12-f)
  lpid=${LWD_PID[A]}
  kill -KILL "$lpid"
  wait "$lpid" 2>/dev/null
  pid_alive "$pid" || fail "SIGKILL of lockwardend A killed the QEMU of s12-a" || return 1
  must_refuse B s12-b "$d" "lockwardend A down, host B starts on s12-a's disk" || return 1
  must_refuse A s12-i "$d" "lockwardend A down, host A starts another VM on s12-a's disk" || return 1
  # A VM that ends during the outage frees its disk (the keeper watches it).
  vsh A destroy s12-f >/dev/null 2>&1
  wait_until 5 eval "! pid_alive $pid2" || true
  wait_until 5 eval "[[ \"\$(try_start B s12-g '$d2')\" == *'COULD start'* ]]" ||
    fail "s12-f destroyed during the outage, but its disk stayed locked" || return 1
  detail "s12-f destroyed during the outage: its disk came free"
  start_lockwardend A || fail "lockwardend A could not be restarted: $(tail -3 "$(hostdir A)/log/lockwardend.log" | paste -sd' ')" || return 1
  must_refuse B s12-c "$d" "lockwardend A restarted, host B" || return 1
  err_name=$(try_start B s12-c2 "$d")
  [[ $err_name == *"VM 's12-a'"* ]] || fail "after the restart the refusal does not name s12-a: $err_name" || return 1
  pid_alive "$pid" || fail "the QEMU of s12-a died after the daemon restart" || return 1
  out=$(vsh A suspend s12-a 2>&1) && out=$(vsh A resume s12-a 2>&1) ||
    fail "suspend/resume of s12-a after the restart failed: $(oneline "$out")" || return 1
  must_refuse B s12-d "$d" "after suspend+resume of s12-a, host B" || return 1
  destroy A s12-a || return 1
  wait_until 5 eval "[[ \"\$(try_start B s12-e '$d')\" == *'COULD start'* ]]" ||
    fail "s12-a destroyed, but its disk stayed locked" || return 1
  detail "s12-a destroyed: its disk came free"
}

# s13_round LOCKSPACE_LABEL: A runs lockd + virtlockd, B runs lockwarden; each refuses a VM on a
# disk the other holds.
s13_round() {
  local label=$1 d
  d=$(mkimg "s13-$label" qcow2)
  start_ok A "s13-$label-a" "rw:$d" || return 1
  start_refused B "s13-$label-b" "rw:$d" || return 1
  detail "[$label] lockwarden host B refused a disk held by lockd host A"
  destroy A "s13-$label-a" || return 1
  start_ok B "s13-$label-c" "rw:$d" || return 1
  start_refused A "s13-$label-d" "rw:$d" || return 1
  detail "[$label] lockd host A refused a disk held by lockwarden host B"
  destroy B "s13-$label-c"
}

s13() {
  lockwarden_mode || {
    EVIDENCE="needs a lockwarden host"
    return 3
  }
  set_lock_manager A lockd || fail "host A: could not switch to lockd" || return 1
  s13_round direct || return 1
  mkdir -p "$IMG/lockspace"
  set_lock_manager A lockd "$IMG/lockspace" || fail "host A: could not restart with file_lockspace_dir" || return 1
  set_lock_manager B lockwarden "$IMG/lockspace" || fail "host B: could not restart with file_lockspace_dir" || return 1
  s13_round lockspace || return 1
  detail "lockspace dir after the last release: $(cd "$IMG/lockspace" && shopt -s nullglob && f=(*) && echo "${#f[@]} file(s) ${f[*]}")"
}

# lease_dom NAME KEY LOCKSPACE: a domain with its own disk and a <lease> on KEY in lockspace
# directory $IMG/leases/LOCKSPACE. (libvirt 9.0 refuses a <lease> without <lockspace> while
# parsing the XML, with "An error occurred, but the cause is unknown".)
lease_dom() {
  local x lease
  x=$(mkdom "$1" "rw:$(mkimg "$1" qcow2)")
  lease="<lease><lockspace>$3</lockspace><key>$2</key><target path='$IMG/leases'/></lease>"
  sed -i "s|^  <devices>\$|  <devices>\n    $lease|" "$x"
  printf '%s' "$x"
}

s14() {
  local x out
  mkdir -p "$IMG/leases/cluster"
  x=$(lease_dom s14-a vmlease1 cluster)
  virsh_ok A create "$x" || {
    lockwarden_mode && return 1
    EVIDENCE="lockd cannot use <lease> here: $EVIDENCE"
    return 3
  }
  x=$(lease_dom s14-b vmlease1 cluster)
  if out=$(vsh B create "$x" 2>&1); then
    fail "host B: s14-b started with lease vmlease1 held by s14-a on A"
    return 1
  fi
  LAST_ERR=$(oneline "$out")
  refusal_is_lock_conflict B s14-b || return 1
  err_mentions vmlease1 || return 1
  detail "host B refused s14-b: $LAST_ERR"
  x=$(lease_dom s14-c vmlease2 cluster)
  virsh_ok B create "$x" || return 1
  destroy A s14-a || return 1
  x=$(lease_dom s14-d vmlease1 cluster)
  virsh_ok B create "$x" || return 1
  detail "after s14-a was destroyed, B took lease vmlease1"
}

# ---------------------------------------------------------------------------------------------
# Issue 20: VMs that were already running when lockwarden was enabled.

# show_lw TITLE: LW_OUT as detail lines under TITLE.
show_lw() {
  detail "$1 (exit $LW_RC):"
  while IFS= read -r l; do detail "  $l"; done <<<"$LW_OUT"
}
# lw_has TEXT...: LW_OUT contains each TEXT (fixed strings).
lw_has() {
  local t
  for t in "$@"; do
    grep -qF -- "$t" <<<"$LW_OUT" || {
      fail "lockwarden output lacks '$t': $(oneline "$LW_OUT")"
      return 1
    }
  done
}
lw_rc() { # WANT WHAT
  [ "$LW_RC" = "$1" ] || fail "$2 exited $LW_RC, expected $1: $(oneline "$LW_OUT")"
}

s15() {
  local d1 d2 d3 s r pa pb
  lockwarden_mode || {
    EVIDENCE="needs lockwardend"
    return 3
  }
  d1=$(mkimg s15-a qcow2)
  d2=$(mkimg s15-b qcow2)
  d3=$(mkimg s15-c qcow2)
  s=$(mkimg s15-shared raw)
  r=$(mkimg s15-ro qcow2)
  # VMs started before lockwarden was enabled: libvirtd A runs with lock_manager = "nop".
  set_lock_manager A nop || fail "host A: could not switch to lock_manager nop" || return 1
  start_ok A s15-a "rw:$d1" "shared:$s" "ro:$r" || return 1
  start_ok A s15-b "rw:$d2" || return 1
  start_ok A s15-c "rw:$d3" || return 1
  # The dangerous case the operator must hear about: nothing stopped host B from using s15-c's
  # disk as well.
  start_ok B s15-x "rw:$d3" || return 1
  pa=$(qemu_pid A s15-a)
  pb=$(qemu_pid A s15-b)
  set_lock_manager A lockwarden || fail "host A: could not switch back to lockwarden" || return 1
  detail "host A: libvirtd restarted with lock_manager = \"lockwarden\"; s15-a/b/c kept running"
  [ "$(qemu_pid A s15-a)" = "$pa" ] || fail "s15-a has a new QEMU after the libvirtd restart" || return 1
  lw A audit
  show_lw "host A: lockwarden audit before adopt"
  lw_rc 1 "audit with unprotected VMs" || return 1
  lw_has "s15-a: UNPROTECTED" "s15-b: UNPROTECTED" "s15-c: HELD ELSEWHERE" "s15-x" "lw-e2e-b" || return 1
  lw A audit --json
  grep -q '"verdict": "unprotected"' <<<"$LW_OUT" || fail "audit --json has no unprotected verdict: $(oneline "$LW_OUT")" || return 1
  lw A adopt --all --dry-run
  show_lw "host A: lockwarden adopt --all --dry-run"
  lw_rc 1 "adopt --dry-run with a VM that would be refused" || return 1
  lw_has "s15-a: would take 3 lease(s) for QEMU pid $pa" "s15-c: would be refused" || return 1
  lw A audit
  lw_has "s15-a: UNPROTECTED" || return 1
  detail "the dry run took nothing (audit still says s15-a is unprotected)"
  lw A adopt --all
  show_lw "host A: lockwarden adopt --all"
  lw_rc 1 "adopt --all with s15-c's disk held on host B" || return 1
  lw_has "s15-a: adopted" "s15-b: adopted" "s15-c: NOT adopted" "VM 's15-x'" "lw-e2e-b" || return 1
  # Adopted VMs are protected as if libvirt had started them under lockwarden.
  start_refused B s15-d "rw:$d1" || return 1
  err_mentions "$d1" "VM 's15-a'" "on host lw-e2e-a" || return 1
  start_refused B s15-e "rw:$d2" || return 1
  start_refused B s15-f "raw:$s" || return 1
  start_refused B s15-g "rw:$r" || return 1
  start_ok B s15-h "shared:$s" || return 1
  detail "host B: writers refused on s15-a's writable, shareable and read-only disks; a sharer started"
  destroy B s15-h || return 1
  # Once host B's VM is gone, s15-c can be adopted too.
  destroy B s15-x || return 1
  lw A adopt s15-c
  show_lw "host A: lockwarden adopt s15-c (after s15-x on B was destroyed)"
  lw_rc 0 "adopt s15-c" || return 1
  start_refused B s15-i "rw:$d3" || return 1
  lw A audit
  show_lw "host A: lockwarden audit after adopt"
  lw_rc 0 "audit with every VM adopted" || return 1
  lw_has "s15-a: protected (3 of 3 held)" "s15-b: protected" "s15-c: protected" || return 1
  # libvirt now drives the adopted VM through the plugin like any other: suspend releases,
  # resume takes the leases again.
  virsh_ok A suspend s15-b || return 1
  wait_until 5 eval "[[ \"\$(try_start B s15-l '$d2')\" == *'COULD start'* ]]" ||
    fail "s15-b suspended, but its disk stayed locked" || return 1
  virsh_ok A resume s15-b || return 1
  start_refused B s15-m "rw:$d2" || return 1
  detail "adopted s15-b: suspend freed its disk, resume took it back"
  # The VMs' exit frees their disks: no lifetime connection, the pidfd watches QEMU.
  destroy A s15-b || return 1
  kill -KILL "$pa"
  wait_until 10 gone A s15-a || fail "host A: libvirt did not notice that s15-a's QEMU $pa was killed" || return 1
  wait_until 5 eval "! pid_alive $pb" || true
  wait_until 5 eval "[[ \"\$(try_start B s15-j '$d1')\" == *'COULD start'* ]]" ||
    fail "s15-a's QEMU was killed, but its disk stayed locked" || return 1
  wait_until 5 eval "[[ \"\$(try_start B s15-k '$d2')\" == *'COULD start'* ]]" ||
    fail "s15-b was destroyed, but its disk stayed locked" || return 1
  detail "SIGKILL of s15-a's QEMU and virsh destroy of s15-b freed their disks"
  destroy A s15-c || return 1
  lw A audit
  show_lw "host A: lockwarden audit after the VMs ended"
  lw_rc 0 "audit with no VM" || return 1
}

# s16: moving a host from lockd to lockwarden without restarting its VMs (docs/migration.md).
s16() {
  local d s t0 window pid
  lockwarden_mode || {
    EVIDENCE="needs lockwardend"
    return 3
  }
  d=$(mkimg s16 qcow2)
  s=$(mkimg s16-shared raw)
  set_lock_manager A lockd || fail "host A: could not switch to lockd" || return 1
  start_ok A s16-a "rw:$d" "shared:$s" || return 1
  start_refused B s16-b "rw:$d" || return 1
  # Step 1: libvirtd A switches to lockwarden; virtlockd keeps the running VM's locks.
  set_lock_manager A lockwarden || fail "host A: could not switch to lockwarden" || return 1
  detail "step 1: libvirtd A restarted with lockwarden; virtlockd still runs"
  start_refused B s16-c "rw:$d" || return 1
  lw A audit
  show_lw "host A: audit while virtlockd still holds s16-a's locks"
  lw_rc 1 "audit with a VM held by virtlockd" || return 1
  lw_has "s16-a: HELD ELSEWHERE" "virtlockd" || return 1
  lw A adopt s16-a
  show_lw "host A: adopt while virtlockd holds the disk"
  lw_rc 1 "adopt of a disk virtlockd holds" || return 1
  lw_has "NOT adopted" "virtlockd" || return 1
  # Step 2: SIGKILL virtlockd (its SIGTERM path sends SIGTERM to every QEMU whose locks it
  # holds: seen here as "terminating on signal 15 from pid N (virtlockd)" in the domain log)
  # and adopt at once; the window is this step's duration.
  pid=$(qemu_pid A s16-a)
  t0=$(now_ms)
  kill -KILL "${LOCKD_PID[A]}"
  wait "${LOCKD_PID[A]}" 2>/dev/null
  LOCKD_PID[A]=
  lw A adopt --all
  window=$(since "$t0")
  show_lw "step 2: virtlockd SIGKILLed, then lockwarden adopt --all"
  lw_rc 0 "adopt after virtlockd was killed" || return 1
  pid_alive "$pid" || fail "s16-a's QEMU $pid died when virtlockd was killed" || return 1
  lw_has "s16-a: adopted" || return 1
  detail "window without a lock on s16-a's disks (virtlockd stop + adopt): $window"
  start_refused B s16-d "rw:$d" || return 1
  err_mentions "VM 's16-a'" || return 1
  start_refused B s16-e "raw:$s" || return 1
  lw A audit
  show_lw "host A: audit after the move"
  lw_rc 0 "audit after the move" || return 1
  destroy A s16-a || return 1
  wait_until 5 eval "[[ \"\$(try_start B s16-f '$d')\" == *'COULD start'* ]]" ||
    fail "s16-a destroyed, but its disk stayed locked" || return 1
  start_virtlockd A
}

# ---------------------------------------------------------------------------------------------

# file_size PATH: size in bytes (0 if missing).
file_size() { stat -c %s "$1" 2>/dev/null || echo 0; }

# failure_context: what the daemons logged during a failed scenario.
failure_context() {
  local h d f
  for h in "${HOSTS[@]}"; do
    d=$(hostdir "$h")
    tail -c +"$((${LOG_OFF[$h.libvirtd]:-0} + 1))" "$d/log/libvirtd.log" 2>/dev/null |
      grep -E ' (error|warning) : ' | tail -6 | sed "s/^/#   libvirtd $h: /"
    f=$d/log/lockwardend.log
    [ -e "$f" ] && tail -c +"$((${LOG_OFF[$h.lockwardend]:-0} + 1))" "$f" | tail -6 | sed "s/^/#   lockwardend $h: /"
  done
  true
}

declare -A LOG_OFF=()
run_scenario() {
  local n=$1 title=$2 t0 rc h
  if [ -n "$ONLY" ] && ! grep -qw "$n" <<<"$ONLY"; then return 0; fi
  EVIDENCE=''
  LAST_ERR=''
  for h in "${HOSTS[@]}"; do
    LOG_OFF[$h.libvirtd]=$(file_size "$(hostdir "$h")/log/libvirtd.log")
    LOG_OFF[$h.lockwardend]=$(file_size "$(hostdir "$h")/log/lockwardend.log")
  done
  t0=$(now_ms)
  "s$n"
  rc=$?
  case $rc in
  0) echo "PASS $n $title" && PASSED=$((PASSED + 1)) ;;
  2) echo "INFO $n $title: $EVIDENCE" ;;
  3) echo "SKIP $n $title: $EVIDENCE" ;;
  *) echo "FAIL $n $title: $EVIDENCE" && FAILED=$((FAILED + 1)) && failure_context ;;
  esac
  for h in "${HOSTS[@]}"; do clean_domains "$h"; done
  # A scenario that reconfigured hosts (13) leaves them as the suite started them.
  for h in "${HOSTS[@]}"; do
    if [ -n "${RECONFIGURED[$h]:-}" ]; then
      set_lock_manager "$h" "$MODE" || echo "# host $h could not be restored to $MODE (direct)"
      unset 'RECONFIGURED[$h]'
    fi
  done
  detail "scenario $n took $(since "$t0")"
}

run_all_scenarios() {
  run_scenario 1 "second VM on a held disk, same host, is refused"
  run_scenario 2 "second VM on a held disk, other host, is refused"
  run_scenario 3 "shareable disk: VMs on both hosts share it, an exclusive user is refused"
  run_scenario 4 "read-only disk: readers on both hosts, a writer is refused"
  run_scenario 5 "destroy / SIGKILL of the holder frees the disk for the other host"
  run_scenario 6 "8-disk VM holds all its disks; a refused start leaves its free disk unlocked"
  run_scenario 7 "libvirtd restart keeps the lease"
  run_scenario 8 "suspend frees the lease, resume is refused while held elsewhere, then succeeds"
  run_scenario 9 "hot-plug, unplug and CD-ROM media change move leases"
  run_scenario 10 "managedsave + restore keeps protection"
  run_scenario 11 "live migration A -> B moves the lease"
  run_scenario 12 "lockwardend SIGKILL while a VM runs: no window for another host"
  run_scenario 13 "mixed cluster: lockd+virtlockd host and lockwarden host, direct and lockspace"
  # Beyond issue 3's list: <lease> elements, which docs/interfaces.md §3 promises and lockd cannot do.
  run_scenario 14 "<lease> elements: one lease key, two hosts"
  # Issue 20: VMs that were running before lockwarden was enabled.
  run_scenario 15 "audit and adopt VMs started under lock_manager nop"
  run_scenario 16 "lockd -> lockwarden without restarting a running VM"
  # Issue 15: partition safety on the FUSE lock server (lib/partition.sh).
  run_scenario 17 "partition: host A's VM is stopped before its lease expires, B takes the disk, A's VM never runs again"
}
