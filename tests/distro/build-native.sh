#!/usr/bin/env bash
# Build the Debian package natively for one Debian release, with that release's own toolchain
# (cargo/rustc, debhelper, systemd.pc), and check it with that release's lintian.
#
#   bash tests/distro/build-native.sh trixie      # as root; prints the .deb's path last
#   bash tests/distro/run.sh trixie --deb "$(bash tests/distro/build-native.sh trixie | tail -1)"
#
# Uses the cached root file system of tests/distro/run.sh ($LOCKWARDEN_DISTRO_CACHE/<suite>/root,
# run run.sh once to create it) through an overlay, installs the Build-Depends there with apt
# (network), and runs dpkg-buildpackage -b on the upstream tarball that scripts/build-deb.sh
# made (target/debian/build/lockwarden_VERSION.orig.tar.xz; run it first). Debian 12's rustc
# (1.63) is too old for lockwarden (>= 1.85), so only trixie and later can build natively;
# scripts/build-deb.sh builds for Debian 12 with a rustup toolchain.
# Result: target/debian/<suite>/lockwarden_VERSION-REV_amd64.deb. Not run by cargo test.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${LOCKWARDEN_DISTRO_CACHE:-/var/cache/lockwarden-distro}
SUITE=${1:?usage: build-native.sh SUITE (e.g. trixie)}
die() {
  echo "build-native: $*" >&2
  exit 1
}
[ "$(id -u)" = 0 ] || die "must run as root (overlay mount, chroot)"
lower=$CACHE/$SUITE/root
[ -f "$CACHE/$SUITE/ok" ] || die "no cached $SUITE root in $CACHE/$SUITE: run bash tests/distro/run.sh $SUITE once"
orig=$(ls -t "$ROOT"/target/debian/build/lockwarden_*.orig.tar.xz 2>/dev/null | head -1)
[ -n "$orig" ] || die "no target/debian/build/lockwarden_*.orig.tar.xz: run bash scripts/build-deb.sh first"

W=$(mktemp -d /var/tmp/lockwarden-native.XXXXXX)
cleanup() {
  umount "$W/root/proc" 2>/dev/null || true
  umount "$W/root" 2>/dev/null || umount -l "$W/root" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/upper" "$W/work" "$W/root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$W/upper,workdir=$W/work" "$W/root"
mount -t proc proc "$W/root/proc"
cp /etc/resolv.conf "$W/root/etc/resolv.conf" 2>/dev/null || true

mkdir -p "$W/root/build"
cp "$orig" "$W/root/build/"
tar -xJf "$orig" -C "$W/root/build"
src=$(cd "$W/root/build" && ls -d lockwarden-*/ | head -1)
src=${src%/}
rm -rf "$W/root/build/$src/packaging"
cp -r "$ROOT/packaging/debian" "$W/root/build/$src/debian"

echo "build-native: installing $SUITE's build dependencies (apt, network)" >&2
# The Build-Depends of packaging/debian/control, plus lintian.
chroot "$W/root" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q --no-install-recommends build-essential lintian \
    debhelper dpkg-dev fakeroot meson ninja-build cargo rustc libclang-dev clang pkgconf \
    systemd-dev augeas-tools man-db binutils' >"$W/apt.log" 2>&1 ||
  { tail -20 "$W/apt.log" >&2; die "installing the build dependencies in $SUITE failed"; }

echo "build-native: dpkg-buildpackage -b in $SUITE (Debian's own cargo; takes minutes)" >&2
if ! chroot "$W/root" /bin/sh -c "cd /build/$src && dpkg-checkbuilddeps &&
    DEB_BUILD_OPTIONS=parallel=$(nproc) dpkg-buildpackage -b -us -uc" >"$W/build.log" 2>&1; then
  tail -40 "$W/build.log" >&2
  die "the native $SUITE build failed"
fi
deb=$(cd "$W/root/build" && ls lockwarden_*_amd64.deb | head -1)
out=$ROOT/target/debian/$SUITE
mkdir -p "$out"
cp "$W/root/build/$deb" "$out/$deb"
rustc_v=$(chroot "$W/root" rustc --version)
echo "build-native: built $out/$deb with $rustc_v" >&2
lint=$(chroot "$W/root" /bin/sh -c "lintian --pedantic -I /build/$deb" 2>&1 | grep -v 'root privileges' || true)
printf '%s\n' "$lint" | sed 's/^/build-native: lintian: /' >&2
if printf '%s\n' "$lint" | grep -q '^E: '; then
  die "$SUITE's lintian reports errors (above)"
fi
echo "$out/$deb"
