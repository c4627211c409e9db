#!/bin/sh
# Called by meson (custom_target 'cargo-build'): builds the crate with cargo and copies the three
# artefacts into meson's build directory, where meson installs them from.
#
#   cargo-build.sh CARGO MANIFEST TARGET_DIR PROFILE OFFLINE OUTDIR SYSCONFDIR
#
# CARGO_HOME, RUSTFLAGS, CARGO_BUILD_JOBS and every other cargo variable come from the
# environment meson/ninja run in; nothing here overrides them. LOCKWARDEN_SYSCONFDIR is
# compiled into lockwardend as the directory of its default configuration file
# (SYSCONFDIR/libvirt/lockwardend.conf when run as root); cargo rebuilds when it changes.
set -eu
cargo=$1 manifest=$2 target_dir=$3 profile=$4 offline=$5 outdir=$6
LOCKWARDEN_SYSCONFDIR=$7
export LOCKWARDEN_SYSCONFDIR

set -- build --locked --manifest-path "$manifest" --target-dir "$target_dir" \
    --lib --bin lockwardend --bin lockwarden
if [ "$profile" = release ]; then
    set -- "$@" --release
fi
if [ "$offline" = true ]; then
    set -- "$@" --offline
fi
echo "lockwarden: $cargo $*" >&2
"$cargo" "$@"

for f in liblockwarden.so lockwardend lockwarden; do
    src="$target_dir/$profile/$f"
    if [ ! -f "$src" ]; then
        echo "lockwarden: cargo finished but $src is missing" >&2
        exit 1
    fi
    # Replace atomically so an interrupted copy never leaves a half-written file to install.
    cp "$src" "$outdir/.$f.tmp"
    mv -f "$outdir/.$f.tmp" "$outdir/$f"
done
