# shellcheck shell=bash
# Scenario 17 (issue 15, docs/storage.md "Partitions"): a partition of host A from its storage,
# with real libvirt + QEMU on the simulated lock server (tests/fusefs/testfs.rs with
# `lease_ms`). Sourced by tests/e2e/run.sh after lib/scenarios.sh; run.sh sets LW_TESTFS.
#
# The "server" is one backing directory, $W/s17/export. Each host mounts it with its own testfs
# at the same path, $W/s17/mnt, inside its own mount namespace (so the VMs of both hosts name the
# same disk path, as two NFS clients would): two mounts = two client hosts whose locks conflict
# through the backing files. A's control file gets `hang 1` (the partition: every request of A's
# mount waits, A's lease is not renewed) and later loses it (the heal). After `lease_ms` of
# silence testfs drops A's locks and revokes the lock state of the files that held them
# (lock requests and I/O on them fail with EIO), the strict NFSv4 server.
#
# Settings: heartbeat every 500 ms, fence after 3000 ms, server lease 6000 ms: the inequality
# fence_after + T_stop + slack < lease leaves 3 s here. Both hosts' lockwardends are restarted
# with them for this scenario and restarted with the suite's config afterwards.
#
# Steps and what is checked:
#   1. A defines and starts s17-a (<on_lockfailure>pause</on_lockfailure>) and s17-k (no
#      on_lockfailure: libvirt's default, which lockwardend fences with SIGKILL), each with a raw
#      disk on the mount. B is refused s17-a's disk.
#   2. Partition A. A sampler per VM records the state of every thread of its QEMU from /proc
#      (stopped / dying / runnable / gone, see s17_pstate) with wall-clock timestamps
#      (EPOCHREALTIME: the clock of testfs's event log), until the end.
#   3. Within fence_after + 2 s of the partition s17-a's QEMU is stopped (every thread in state
#      T) and s17-k's killed. libvirt still reports s17-a as "running (booted)": lockwardend,
#      not libvirt, stopped it.
#   4. Before the lease runs out, B is refused the disk (the server still has A's lock).
#   5. After testfs logged A's lease expiry, B starts s17-b and s17-l on the two disks: both
#      succeed.
#   6. Heal A. By today's rule (docs/storage.md) s17-a's lock is re-checked, found lost (EIO),
#      and the VM killed. Sampled for 5 s: neither QEMU is ever runnable from the moment B asked
#      for the disks; both are gone; libvirt reports both "shut off (crashed)"; lockwardend A
#      logged FENCE once per VM (SIGSTOP for s17-a, SIGKILL for s17-k) and s17-a's loss once.
#   7. `virsh start` of s17-a and s17-k on A is refused (B holds the disks).
#
# What QEMU does on the partitioned FUSE mount (found with this scenario; kernel 6.18):
# - The test VMs have no OS (SeaBIOS reads the boot sector once and idles), so no guest I/O is
#   waiting in A's mount when the fence comes: SIGSTOP stops every thread at once.
# - A guest write waiting in the partitioned mount when the fence comes is not stopped by
#   SIGSTOP, and lands on the disk at the heal, after host B has taken it: shown by the opt-in
#   experiment LW_E2E_S17_INFLIGHT_WRITE=1 (s17_inflight_body, reports INFO, never PASS).
# - A SIGKILLed QEMU (s17-k) does not vanish while the mount is partitioned. Its threads die,
#   but the exiting one closes QEMU's files, and closing a file on FUSE sends a FLUSH that the
#   kernel waits for uninterruptibly (a forced request: SIGKILL cannot cut it short): the
#   process stays in state D in do_exit -> filp_close -> fuse_flush -> request_wait_answer until
#   the server answers (the heal) or the FUSE connection is aborted (its server killed, or
#   /sys/fs/fuse/connections/N/abort). It runs no guest code any more (PF_EXITING: s17_pstate
#   counts it "dying"), lockwardend keeps its lease until it is gone, and libvirt cannot destroy
#   it either ("Failed to terminate process N with SIGKILL: Device or resource busy" after
#   trying for a while). Whether an NFS mount holds an exiting QEMU the same way was not
#   checked (these machines have no NFS client).
# - So the teardown heals A's mount before destroying anything, and kills the testfs servers
#   (which aborts their connections) before unmounting: nothing stays blocked on a mount.

S17_INTERVAL_MS=500
S17_FENCE_MS=3000
S17_LEASE_MS=6000
# Bound on partition -> stopped beyond fence_after_ms (loaded 2-core CI: a bound, not a claim).
S17_SLACK_MS=2000
# How long A's QEMU is watched after the heal (seconds).
S17_WATCH_S=5
declare -A S17_FS_PID=()

s17_dir() { printf '%s/s17' "$W"; }
# Wall-clock milliseconds without a fork.
s17_ms() {
  local t=${EPOCHREALTIME/./}
  printf '%s' "${t:0:-3}"
}

# s17_ctl HOST LINE...: replace HOST's testfs control file atomically.
s17_ctl() {
  local h=$1 d
  shift
  d=$(s17_dir)
  printf '%s\n' "$@" >"$d/ctl-$h.tmp" && mv -f "$d/ctl-$h.tmp" "$d/ctl-$h"
}

# s17_mounted HOST: testfs's mount is in HOST's namespace (read from testfs's own mountinfo,
# which touches nothing on the mount).
s17_mounted() {
  grep -q " $(s17_dir)/mnt [^ ]* [^-]*- fuse" "/proc/${S17_FS_PID[$1]}/mountinfo" 2>/dev/null
}

s17_mount() {
  local h=$1 d
  d=$(s17_dir)
  s17_ctl "$h" "lease_ms $S17_LEASE_MS"
  nsenter -t "${ANCHOR[$h]}" -m -u -- "$LW_TESTFS" "$d/export" "$d/mnt" "$d/ctl-$h" "$d/events-$h" \
    </dev/null >>"$d/testfs-$h.log" 2>&1 &
  S17_FS_PID[$h]=$!
  wait_until 10 s17_mounted "$h" ||
    fail "host $h: testfs did not mount $d/mnt: $(tail -3 "$d/testfs-$h.log" | paste -sd' ')"
}

# s17_lockwardend HOST [EXTRA_CONFIG]: restart lockwardend on HOST with the suite's config plus
# EXTRA_CONFIG (none: the suite's config again).
s17_lockwardend() {
  local h=$1 extra=${2:-} conf
  conf=$(hostdir "$h")/etc/lockwardend.conf
  [ -e "$conf.s17" ] || cp "$conf" "$conf.s17"
  cp "$conf.s17" "$conf"
  [ -n "$extra" ] && printf '%s\n' "$extra" >>"$conf"
  stop_pid "${LWD_PID[$h]:-}" 10
  start_lockwardend "$h"
}

# s17_pstate PID START: one word for the state of process PID (START: its start time, field 22
# of /proc/PID/stat, so a reused pid counts as gone):
#   gone      no such process (or a zombie: it has exited)
#   stopped   every thread in state T/t (SIGSTOP): the guest cannot run
#   dying     some thread not stopped, but the process is exiting (PF_EXITING on every live
#             thread) or has SIGKILL pending: it cannot return to the guest
#   runnable  anything else (R, S, D threads of a live process: a thread in D waits in the
#             kernel, e.g. for the storage, and carries on when it answers; SIGSTOP does not
#             stop it until then, see s17_inflight_body)
# followed by ":" and the thread states, e.g. "stopped:TTTTT".
s17_pstate() {
  local pid=$1 start=$2 t s rest st flags states='' exiting=1 line pnd
  read -r s 2>/dev/null <"/proc/$pid/stat" || { echo gone: && return; }
  rest=${s##*) }
  # shellcheck disable=SC2086 # field splitting wanted
  set -- $rest
  [ "${20:-}" = "$start" ] || { echo gone:reused && return; }
  # Every thread: the group leader can be a zombie while another thread still exits.
  for t in /proc/"$pid"/task/*; do
    read -r s 2>/dev/null <"$t/stat" || continue
    rest=${s##*) }
    read -r st _ _ _ _ _ flags _ <<<"$rest"
    [ "$st" = Z ] || [ "$st" = X ] && continue
    states+=$st
    # PF_EXITING on every live thread (QEMU's idle pool threads exit on their own while the
    # rest of the process runs on).
    ((flags & 4)) || exiting=0
  done
  [ -n "$states" ] || { echo gone:Z && return; }
  while read -r line; do
    case $line in
    ShdPnd:* | SigPnd:*)
      pnd=${line##*[[:space:]]}
      ((16#${pnd: -3} & 0x100)) && exiting=1 # SIGKILL pending
      ;;
    esac
  done 2>/dev/null <"/proc/$pid/status"
  if [[ $states =~ ^[Tt]+$ ]]; then
    echo "stopped:$states"
  elif ((exiting)); then
    echo "dying:$states"
  else
    echo "runnable:$states"
  fi
}

# s17_sampler PID START OUT: record every change of s17_pstate to OUT ("MS STATE") every ~20 ms
# until killed; every sample also bumps a count in OUT.n.
s17_sampler() {
  local pid=$1 start=$2 out=$3 last='' cur n=0
  while :; do
    cur=$(s17_pstate "$pid" "$start")
    n=$((n + 1))
    if [ "$cur" != "$last" ]; then
      printf '%s %s\n' "$(s17_ms)" "$cur" >>"$out"
      last=$cur
    fi
    printf '%s\n' "$n" >"$out.n"
    sleep 0.02
  done
}

# s17_expiry_ms: when testfs A expired A's lease (its event log: "expire N 0 NS NS 0", wall-clock
# nanoseconds), in milliseconds; empty if not yet.
s17_expiry_ms() {
  awk '$1 == "expire" && length($4) > 6 { print substr($4, 1, length($4) - 6); exit }' "$(s17_dir)/events-A" 2>/dev/null
}

# s17_refused RESULT WHEN: RESULT (of try_start) is a refusal by the lock manager.
s17_refused() {
  detail "$2: $1"
  [[ $1 == *"was refused"* ]] || fail "$2: $1" || return 1
  [[ $1 == *"resource busy"* ]] || fail "$2: refused, but not with a lock conflict: $1" || return 1
}

# s17_wchans PID: where in the kernel each live (not zombie) thread of PID waits.
s17_wchans() {
  local t s w out=''
  for t in /proc/"$1"/task/*; do
    read -r s 2>/dev/null <"$t/stat" || continue
    [[ ${s##*) } == [ZX]* ]] && continue
    w=$(cat "$t/wchan" 2>/dev/null)
    out+="${out:+,}${w:-?}"
  done
  printf '%s' "${out:-nothing (gone)}"
}

# s17_first OUT WORD [FROM_MS]: time of the first sample in state WORD at or after FROM_MS.
s17_first() {
  awk -v w="$2" -v from="${3:-0}" '$1 >= from && index($2, w ":") == 1 { print $1; exit }' "$1" 2>/dev/null
}

s17() {
  local rc
  lockwarden_mode || {
    EVIDENCE="needs lockwardend's heartbeat and fence"
    return 3
  }
  [ -x "${LW_TESTFS:-}" ] || {
    fail "the FUSE lock server testfs ($LW_TESTFS) is missing: cargo build --example testfs"
    return 1
  }
  S17_SAMPLERS=()
  if [ -n "${LW_E2E_S17_INFLIGHT_WRITE:-}" ]; then
    s17_inflight_body
  else
    s17_body
  fi
  rc=$?
  s17_teardown
  return "$rc"
}

# s17_vm NAME DISK [ACTION [KIND]]: define and start NAME on host A (on_lockfailure ACTION, or
# none: libvirt's default; disk KIND of mkdom, default raw); sets PID and START (its start time)
# for the caller.
s17_vm() {
  local name=$1 disk=$2 action=${3:-} kind=${4:-raw} xml line
  xml=$(mkdom "$name" "$kind:$disk")
  if [ -n "$action" ]; then
    sed -i "s|^  <on_crash>destroy</on_crash>\$|&\n  <on_lockfailure>$action</on_lockfailure>|" "$xml"
    grep -q "<on_lockfailure>$action</on_lockfailure>" "$xml" || fail "could not add on_lockfailure to $xml" || return 1
  fi
  virsh_ok A define "$xml" || return 1
  virsh_ok A start "$name" || return 1
  expect_state A "$name" running || return 1
  PID=$(qemu_pid A "$name")
  [ -n "$PID" ] || fail "host A: no pid file for $name" || return 1
  read -r line <"/proc/$PID/stat"
  line=${line##*) }
  # shellcheck disable=SC2086 # field splitting wanted
  set -- $line
  START=${20}
}

# s17_never_runnable SAMPLES FROM_MS WHAT: no sampled state that overlaps [FROM_MS, end) is
# "runnable" (a state holds from its sample until the next change).
s17_never_runnable() {
  local bad
  bad=$(awk -v from="$2" '{ t[NR] = $1; st[NR] = $2 }
    END { for (i = 1; i <= NR; i++) { end = (i < NR) ? t[i + 1] : 9e18
            if (index(st[i], "runnable:") == 1 && end > from) print t[i] " " st[i] } }' "$1")
  [ -z "$bad" ] || fail "$3 was runnable at $(paste -sd' ' <<<"$bad") (ms since the epoch)"
}

# s17_show SAMPLES T0 NAME: the recorded state changes as detail lines.
s17_show() {
  local n st
  detail "$3's QEMU sampled $(cat "$1.n" 2>/dev/null) times; state changes (ms after the partition):"
  while read -r n st; do detail "  +$((n - $2)) ms $st"; done <"$1"
}

s17_body() {
  local d disk diskk pa sa pk sk t_part t_stop t_kill t_exp t_b0 t_b1 t_heal t_gone t_gonek
  local off r line log fences exp_n PID START
  d=$(s17_dir)
  mkdir -p "$d/export" "$d/mnt"
  off=$(file_size "$(hostdir A)/log/lockwardend.log")
  # Both hosts' lockwardends with short heartbeat settings (restored by s17_teardown).
  for h in A B; do
    s17_lockwardend "$h" "heartbeat_interval_ms = $S17_INTERVAL_MS
fence_after_ms = $S17_FENCE_MS" || fail "host $h: lockwardend did not restart with heartbeat settings" || return 1
    s17_mount "$h" || return 1
  done
  detail "testfs lease_ms $S17_LEASE_MS on both hosts' mounts of $d/export; lockwardend heartbeat_interval_ms $S17_INTERVAL_MS, fence_after_ms $S17_FENCE_MS"
  qemu-img create -q -f raw "$d/export/s17.raw" 1M && qemu-img create -q -f raw "$d/export/s17k.raw" 1M ||
    fail "qemu-img create failed" || return 1
  disk=$d/mnt/s17.raw
  diskk=$d/mnt/s17k.raw

  # 1. A runs s17-a (on_lockfailure=pause) and s17-k (no on_lockfailure: SIGKILL when fenced),
  # persistent so that libvirt can report how they ended.
  s17_vm s17-a "$disk" pause || return 1
  pa=$PID sa=$START
  s17_vm s17-k "$diskk" || return 1
  pk=$PID sk=$START
  # The heartbeat of A's mount reaches the server before the partition.
  wait_until 10 eval "grep -qs 'host=lw-e2e-a ' '$d/export/.lockwarden/heartbeat@lw-e2e-a'" ||
    fail "host A: no heartbeat of lockwardend A reached the server ($d/export/.lockwarden)" || return 1
  s17_refused "$(try_start B s17-p1 "$disk" raw)" "before the partition, host B" || return 1

  # 2. Partition A.
  s17_sampler "$pa" "$sa" "$d/samples-a" &
  S17_SAMPLERS+=($!)
  s17_sampler "$pk" "$sk" "$d/samples-k" &
  S17_SAMPLERS+=($!)
  t_part=$(s17_ms)
  s17_ctl A "lease_ms $S17_LEASE_MS" "hang 1"
  detail "host A partitioned from the server (testfs: hang 1)"

  # 3. Fenced within fence_after + slack: s17-a stopped, s17-k killed.
  wait_until $(((S17_FENCE_MS + S17_SLACK_MS) / 1000 + 1)) eval "[ -n \"\$(s17_first '$d/samples-a' stopped '$t_part')\" ]" ||
    fail "host A: s17-a's QEMU $pa was not stopped within $((S17_FENCE_MS + S17_SLACK_MS)) ms of the partition (sampled: $(tail -3 "$d/samples-a" | paste -sd' '))" || return 1
  wait_until 2 eval "[ -n \"\$(s17_first '$d/samples-k' dying '$t_part')\$(s17_first '$d/samples-k' gone '$t_part')\" ]" ||
    fail "host A: s17-k's QEMU $pk was not killed with s17-a (sampled: $(tail -3 "$d/samples-k" | paste -sd' '))" || return 1
  t_stop=$(s17_first "$d/samples-a" stopped "$t_part")
  t_kill=$(awk -v from="$t_part" '$1 >= from && $2 ~ /^(dying|gone):/ { print $1; exit }' "$d/samples-k")
  detail "partition -> s17-a's QEMU stopped (every thread T): $((t_stop - t_part)) ms, s17-k's killed: $((t_kill - t_part)) ms (fence_after_ms $S17_FENCE_MS; the clock runs from the last confirmed beat, up to one interval before the partition)"
  ((t_stop - t_part <= S17_FENCE_MS + S17_SLACK_MS)) ||
    fail "host A: stopped only $((t_stop - t_part)) ms after the partition" || return 1
  # Not premature: the last confirmed beat was sent at most about one interval before the
  # partition (two, for a loaded event loop).
  ((t_stop - t_part >= S17_FENCE_MS - 2 * S17_INTERVAL_MS)) ||
    fail "host A: stopped $((t_stop - t_part)) ms after the partition, before fence_after_ms could have run out" || return 1
  r=$(vsh A domstate --reason s17-a 2>&1)
  detail "while fenced, libvirt A reports s17-a: $(oneline "$r"), s17-k: $(oneline "$(vsh A domstate --reason s17-k 2>&1)")"
  [ "$r" = "running (booted)" ] || fail "host A: libvirt reports the stopped s17-a as '$(oneline "$r")', docs/storage.md says 'running (booted)'" || return 1

  # 4. Before the lease runs out, the server still has A's lock: B is refused.
  t_b0=$(s17_ms)
  r=$(try_start B s17-p2 "$disk" raw)
  t_exp=$(s17_expiry_ms)
  if [[ $r == *"COULD start"* ]] && [ -n "$t_exp" ] && ((t_exp <= t_b0)); then
    # A loaded machine took the whole lease to get here: the server rightly gave the lock away.
    detail "fenced, host B $((t_b0 - t_part)) ms after the partition (A's lease had already expired): $r"
  else
    s17_refused "$r" "fenced, A's lease not yet expired, host B $((t_b0 - t_part)) ms after the partition" || return 1
  fi

  # 5. The server's lease of A expires; then B starts both VMs' disks.
  wait_until $(((S17_LEASE_MS + S17_SLACK_MS) / 1000 + 1)) grep -qs '^expire ' "$d/events-A" ||
    fail "testfs A did not expire A's lease within $((S17_LEASE_MS + S17_SLACK_MS)) ms of the partition" || return 1
  line=$(grep -m1 '^expire ' "$d/events-A")
  exp_n=$(awk '{print $2}' <<<"$line")
  t_exp=$(s17_expiry_ms)
  detail "server: A's lease expired $((t_exp - t_part)) ms after the partition, $exp_n lock(s) dropped; margin between the fence and the expiry: $((t_exp - t_stop)) ms"
  ((exp_n >= 2)) || fail "testfs dropped $exp_n lock(s) of A at the lease expiry, expected both disks' at least: $line" || return 1
  ((t_stop < t_exp && t_kill < t_exp)) || fail "A's VMs were stopped only after the server's lease expired" || return 1
  t_b0=$(s17_ms)
  start_ok B s17-b "raw:$disk" || return 1
  t_b1=$(s17_ms)
  start_ok B s17-l "raw:$diskk" || return 1
  detail "host B started s17-b on s17-a's disk $((t_b1 - t_part)) ms after the partition (virsh create took $((t_b1 - t_b0)) ms), and s17-l on s17-k's; s17-k's QEMU meanwhile: $(tail -1 "$d/samples-k" | cut -d' ' -f2), waiting in $(s17_wchans "$pk")"

  # 6. Heal A and watch its QEMUs.
  t_heal=$(s17_ms)
  s17_ctl A "lease_ms $S17_LEASE_MS"
  detail "host A healed $((t_heal - t_part)) ms after the partition"
  sleep "$S17_WATCH_S"
  kill -KILL "${S17_SAMPLERS[@]}" 2>/dev/null
  wait "${S17_SAMPLERS[@]}" 2>/dev/null
  S17_SAMPLERS=()
  s17_show "$d/samples-a" "$t_part" s17-a
  s17_show "$d/samples-k" "$t_part" s17-k
  # The invariant: from the moment B asked for the disks, A's VMs are never runnable.
  s17_never_runnable "$d/samples-a" "$t_b0" "host A's s17-a, whose disk host B holds," || return 1
  s17_never_runnable "$d/samples-k" "$t_b0" "host A's s17-k, whose disk host B holds," || return 1
  t_gone=$(s17_first "$d/samples-a" gone "$t_heal")
  [ -n "$t_gone" ] ||
    fail "host A: s17-a's QEMU $pa still exists $S17_WATCH_S s after the heal ($(tail -1 "$d/samples-a")); today's rule kills a VM whose lock was lost" || return 1
  # On FUSE the killed QEMU cannot finish exiting while the mount is silent (the comment at the
  # top): still there, exiting, when the heal came.
  r=$(awk -v to="$t_heal" '$1 < to { st = $2 } END { print st }' "$d/samples-k")
  [[ $r == dying:* ]] ||
    fail "host A: s17-k's killed QEMU was '$r' at the heal, expected still exiting (dying, waiting in the partitioned mount)" || return 1
  t_gonek=$(s17_first "$d/samples-k" gone "$t_part")
  [ -n "$t_gonek" ] ||
    fail "host A: s17-k's QEMU $pk still exists $S17_WATCH_S s after the heal ($(tail -1 "$d/samples-k"))" || return 1
  detail "heal -> s17-a's QEMU gone: $((t_gone - t_heal)) ms; s17-k's: $((t_gonek - t_heal)) ms"
  for r in s17-a s17-k; do
    line=$(vsh A domstate --reason "$r" 2>&1)
    detail "after the heal, libvirt A reports $r: $(oneline "$line")"
    [ "$line" = "shut off (crashed)" ] || fail "host A: libvirt reports $r as '$(oneline "$line")' after its QEMU was killed, expected 'shut off (crashed)'" || return 1
  done

  # lockwardend A: FENCE once per VM, then s17-a's lost lock once.
  log=$(tail -c +"$((off + 1))" "$(hostdir A)/log/lockwardend.log")
  detail "lockwardend A: $(grep -m1 'FENCE: .*"s17-a"' <<<"$log" | sed -E 's/^.*(FENCE: )/\1/' | cut -c1-160)..."
  fences=$(grep -c 'FENCE: .*"s17-a"' <<<"$log")
  [ "$fences" = 1 ] || fail "lockwardend A logged FENCE for s17-a $fences times, expected once" || return 1
  fences=$(grep -c 'FENCE: .*"s17-k"' <<<"$log")
  [ "$fences" = 1 ] || fail "lockwardend A logged FENCE for s17-k $fences times, expected once" || return 1
  grep 'FENCE: .*"s17-a"' <<<"$log" | grep -q 'SIGSTOP' || fail "lockwardend A's FENCE of s17-a does not say SIGSTOP" || return 1
  grep 'FENCE: .*"s17-k"' <<<"$log" | grep -q 'SIGKILL' || fail "lockwardend A's FENCE of s17-k does not say SIGKILL" || return 1
  r=$(grep -c 'VM "s17-a" .*was LOST while' <<<"$log")
  [ "$r" = 1 ] || fail "lockwardend A logged s17-a's lost lock $r times, expected once" || return 1
  detail "lockwardend A after the heal: $(grep -m1 'VM "s17-a" .*was LOST while' <<<"$log" | sed -E 's/^.*(the lock on)/\1/' | cut -c1-200)..."

  # 7. A's VMs do not run again: B holds the disks.
  virsh_refused A start s17-a || return 1
  virsh_refused A start s17-k || return 1
  expect_state B s17-b running && expect_state B s17-l running
}

# LW_E2E_S17_INFLIGHT_WRITE=1 tests/e2e/run.sh --only 17: instead of the checks above, an
# experiment that ends in INFO (never PASS): what becomes of a guest write that is waiting in A's
# partitioned mount when the fence comes. The guest has no OS, so the write is QEMU's own
# (HMP `qemu-io`), which needs the disk shareable (libvirt then sets share-rw=on); lockwarden
# takes a shared lease for it, which B's exclusive start still conflicts with until the lease
# expires. Found (kernel 6.18, QEMU 7.2): the thread doing the write stays in state D
# (request_wait_answer) through the SIGSTOP (the others stop), B takes the disk after the
# lease, and at the heal the write lands on the disk B now owns, before lockwardend kills the
# VM; testfs revokes only the open files that held locks, not QEMU's own (see
# docs/storage.md, "Limits (partition safety)").
s17_inflight_body() {
  local d disk pa sa t_part t_exp before after io PID START
  d=$(s17_dir)
  mkdir -p "$d/export" "$d/mnt"
  for h in A B; do
    s17_lockwardend "$h" "heartbeat_interval_ms = $S17_INTERVAL_MS
fence_after_ms = $S17_FENCE_MS" || fail "host $h: lockwardend did not restart with heartbeat settings" || return 1
    s17_mount "$h" || return 1
  done
  qemu-img create -q -f raw "$d/export/s17.raw" 1M || fail "qemu-img create failed" || return 1
  disk=$d/mnt/s17.raw
  s17_vm s17-a "$disk" pause shared || return 1
  pa=$PID sa=$START
  wait_until 10 eval "grep -qs 'host=lw-e2e-a ' '$d/export/.lockwarden/heartbeat@lw-e2e-a'" ||
    fail "host A: no heartbeat of lockwardend A reached the server" || return 1
  t_part=$(s17_ms)
  s17_ctl A "lease_ms $S17_LEASE_MS" "hang 1"
  (
    timeout 60 virsh -q -c "$(uri A)" qemu-monitor-command --hmp s17-a \
      'qemu-io libvirt-1-format "write -P 0xab 0 4k"' >"$d/qemu-io.out" 2>&1
    echo "exit $? at +$(($(s17_ms) - t_part)) ms" >>"$d/qemu-io.out"
  ) &
  wait_until 3 eval "[[ \"\$(s17_wchans $pa)\" == *request_wait_answer* ]]" ||
    fail "host A: s17-a's write did not reach the partitioned mount (threads wait in $(s17_wchans "$pa"))" || return 1
  detail "partitioned; s17-a writes 4 KiB of 0xab at offset 0: its threads wait in $(s17_wchans "$pa")"
  wait_until $(((S17_FENCE_MS + S17_SLACK_MS) / 1000 + 1)) eval "[[ \"\$(s17_wchans $pa)\" == *do_signal_stop* ]]" ||
    fail "host A: s17-a was not fenced" || return 1
  sleep 0.2
  detail "fenced at ~+$(($(s17_ms) - t_part)) ms: $(s17_pstate "$pa" "$sa"), threads wait in $(s17_wchans "$pa")"
  wait_until $(((S17_LEASE_MS + S17_SLACK_MS) / 1000 + 1)) grep -qs '^expire ' "$d/events-A" ||
    fail "testfs A did not expire A's lease" || return 1
  t_exp=$(s17_expiry_ms)
  start_ok B s17-b "raw:$disk" || return 1
  before=$(od -An -tx1 -N4 "$d/export/s17.raw" | tr -d ' ')
  detail "A's lease expired at +$((t_exp - t_part)) ms; B started s17-b on the disk at +$(($(s17_ms) - t_part)) ms; s17-a: $(s17_pstate "$pa" "$sa"); disk bytes 0-3 on the server: $before"
  s17_ctl A "lease_ms $S17_LEASE_MS"
  detail "healed at +$(($(s17_ms) - t_part)) ms"
  wait_until 10 eval "! [ -d /proc/$pa ]" || true
  sleep 0.5
  after=$(od -An -tx1 -N4 "$d/export/s17.raw" | tr -d ' ')
  io=$(paste -sd' ' "$d/qemu-io.out" 2>/dev/null)
  detail "after the heal: s17-a $(s17_pstate "$pa" "$sa"); disk bytes 0-3 on the server: $after; qemu-io: $io"
  if [ "$after" = abababab ]; then
    EVIDENCE="a guest write waiting in the partitioned mount at the fence (thread in D, not stopped by SIGSTOP) LANDED on the disk at the heal, after host B had taken it (bytes 0-3 $before -> $after)"
  else
    EVIDENCE="a guest write waiting in the partitioned mount at the fence did not land after the heal (bytes 0-3 $before -> $after; qemu-io: $io)"
  fi
  return 2
}

s17_teardown() {
  local h d n
  d=$(s17_dir)
  if [ ${#S17_SAMPLERS[@]} -gt 0 ]; then
    kill -KILL "${S17_SAMPLERS[@]}" 2>/dev/null
    wait "${S17_SAMPLERS[@]}" 2>/dev/null
  fi
  for h in A B; do [ -n "${S17_FS_PID[$h]:-}" ] && s17_ctl "$h" "lease_ms $S17_LEASE_MS"; done
  for h in A B; do clean_domains "$h"; done
  for h in A B; do
    [ -n "${S17_FS_PID[$h]:-}" ] || continue
    # Killing the FUSE server aborts its connection: nothing can stay blocked on the mount.
    kill -KILL "${S17_FS_PID[$h]}" 2>/dev/null
    wait "${S17_FS_PID[$h]}" 2>/dev/null
    in_ns "$h" umount -l "$d/mnt" 2>/dev/null
    S17_FS_PID[$h]=
  done
  for h in A B; do
    s17_lockwardend "$h" || echo "# host $h: lockwardend could not be restarted with the suite's config"
    rm -f "$(hostdir "$h")/etc/lockwardend.conf.s17"
  done
  true
}
