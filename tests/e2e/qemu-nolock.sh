#!/bin/bash
# Emulator wrapper for the e2e suite (used through <emulator> in the domain XML).
#
# QEMU locks its own images (OFD locks on bytes 100-104/200-204) when it opens them, which is
# before libvirt asks the lock manager for the disk leases. Left on, a second VM on the same
# image would be refused by QEMU ("Failed to get "write" lock") and the lock manager would never
# be tested. So every -blockdev of a protocol driver that takes such locks (file, host_device,
# host_cdrom) gets "locking":"off"; everything else, including libvirt's capability probes, is
# passed through unchanged to the real QEMU.
real=${LW_E2E_REAL_QEMU:-/usr/bin/qemu-system-x86_64}
args=()
prev=
for a in "$@"; do
  if [ "$prev" = "-blockdev" ] && [[ "$a" == "{"* ]] &&
     [[ "$a" =~ \"driver\":\"(file|host_device|host_cdrom)\" ]] &&
     [[ "$a" != *'"locking":'* ]]; then
    a="{\"locking\":\"off\",${a#\{}"
  fi
  args+=("$a")
  prev=$a
done
exec "$real" "${args[@]}"
