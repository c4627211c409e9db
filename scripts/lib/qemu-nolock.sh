#!/bin/bash
# Emulator wrapper for the quick start's demo VMs (named by <emulator> in their XML).
#
# QEMU locks the images it opens (its own OFD locks on bytes 100-104 and 200-204), and it opens
# them before libvirt asks the lock manager for the disk leases. On one host QEMU would therefore
# refuse the second VM itself ("Failed to get "write" lock") and the demo would never reach
# lockwarden. This wrapper adds "locking":"off" to every -blockdev of a driver that takes those
# locks (file, host_device, host_cdrom), so that what the demo shows is the lock manager's
# decision. Everything else, including libvirt's capability probes, passes through unchanged.
real=${LOCKWARDEN_QS_REAL_QEMU:-/usr/bin/qemu-system-x86_64}
args=()
prev=
for a in "$@"; do
  if [ "$prev" = -blockdev ] && [[ $a == "{"* ]] &&
    [[ $a =~ \"driver\":\"(file|host_device|host_cdrom)\" ]] &&
    [[ $a != *'"locking":'* ]]; then
    a="{\"locking\":\"off\",${a#\{}"
  fi
  args+=("$a")
  prev=$a
done
exec "$real" "${args[@]}"
