#!/usr/bin/env bash
# Build the Debian package of lockwarden with Debian's own tooling.
#
#   bash scripts/build-deb.sh [--revision REV] [--no-lintian]
#
# 1. scripts/vendor-dist.sh makes the upstream tarball (the work tree's sources plus every crate
#    in vendor/), which becomes target/debian/build/lockwarden_VERSION.orig.tar.xz;
# 2. it is unpacked with packaging/debian/ as debian/, and dpkg-buildpackage -b runs dh, which
#    drives meson (meson-install/, -Doffline=true) and cargo --offline with an empty CARGO_HOME;
# 3. lintian checks the result; an error that packaging/debian/lockwarden.lintian-overrides does
#    not explain fails the build (warnings are printed; docs/packaging.md justifies each one).
#
# Result: target/debian/lockwarden_VERSION-REV_ARCH.deb (VERSION from Cargo.toml, REV from
# packaging/debian/changelog unless --revision REV adds a changelog entry VERSION-REV on top).
# Needs: dpkg-dev, debhelper, fakeroot, lintian, meson, ninja-build, clang, libclang-dev, and
# cargo/rustc >= 1.85. Debian 13 has that rustc; on Debian 12 (rustc 1.63) a rustup toolchain
# on PATH is used and dpkg-buildpackage is told (-d) not to insist on the cargo/rustc packages
# -- only after every other build dependency was checked to be installed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/target/debian
REVISION=''
LINTIAN=1
while [ $# -gt 0 ]; do
  case $1 in
  --revision)
    REVISION=${2:?--revision needs a value, e.g. --revision 2}
    shift
    ;;
  --no-lintian) LINTIAN=0 ;;
  -h | --help)
    sed -n '2,20p' "$0"
    exit 0
    ;;
  *)
    echo "build-deb: unknown argument $1 (see --help)" >&2
    exit 2
    ;;
  esac
  shift
done

die() {
  echo "build-deb: $*" >&2
  exit 1
}
need() { # need COMMAND DEBIAN-PACKAGE
  command -v "$1" >/dev/null 2>&1 ||
    die "$1 not found: install the Debian package $2 (apt-get install $2)"
}
need dpkg-buildpackage dpkg-dev
need dh debhelper
need fakeroot fakeroot
need meson meson
need ninja ninja-build
need cargo "cargo (>= 1.85; on Debian 12 use rustup)"
[ "$LINTIAN" = 0 ] || need lintian lintian

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -1)
[ -n "$version" ] || die "no version = \"...\" line in $ROOT/Cargo.toml"
chlog_version=$(sed -n '1s/^lockwarden (\([^)]*\)).*/\1/p' "$ROOT/packaging/debian/changelog")
[ "${chlog_version%-*}" = "$version" ] ||
  die "packaging/debian/changelog starts with version $chlog_version but Cargo.toml says $version:" \
    "add a changelog entry for $version-1 on top"

# cargo >= 1.85 (edition 2024); the one on PATH is what meson finds.
cargo_v=$(cargo --version | awk '{print $2}')
if ! dpkg --compare-versions "${cargo_v%%-*}" ge 1.85; then
  die "cargo $cargo_v on PATH is too old: lockwarden needs >= 1.85 (Debian 13's cargo, or rustup)"
fi

W=$OUT/build
rm -rf "$W"
mkdir -p "$W"
echo "build-deb: making the vendored upstream tarball (scripts/vendor-dist.sh)"
bash "$ROOT/scripts/vendor-dist.sh" --out "$W" >"$W/vendor-dist.log" 2>&1 ||
  { tail -20 "$W/vendor-dist.log" >&2; die "scripts/vendor-dist.sh failed (log: $W/vendor-dist.log)"; }
mv "$W/lockwarden-$version.tar.xz" "$W/lockwarden_$version.orig.tar.xz"
tar -xJf "$W/lockwarden_$version.orig.tar.xz" -C "$W"
src=$W/lockwarden-$version
[ -d "$src/vendor" ] || die "the upstream tarball has no vendor/ directory"
rm -rf "$src/debian" "$src/packaging"
cp -r "$ROOT/packaging/debian" "$src/debian"

if [ -n "$REVISION" ]; then
  {
    printf 'lockwarden (%s-%s) unstable; urgency=medium\n\n' "$version" "$REVISION"
    printf '  * Rebuild as revision %s (scripts/build-deb.sh --revision).\n\n' "$REVISION"
    printf ' -- lockwarden developers <lockwarden-devel@lists.example.org>  %s\n\n' "$(date -R)"
    cat "$ROOT/packaging/debian/changelog"
  } >"$src/debian/changelog"
fi
debversion=$(cd "$src" && dpkg-parsechangelog -S Version)
arch=$(dpkg-architecture -qDEB_HOST_ARCH)

# Build dependencies: all must be installed. cargo/rustc (>= 1.85) may instead come from a
# rustup toolchain on PATH (checked above); only then is dpkg-buildpackage run with -d.
bdflags=()
if ! unmet=$(cd "$src" && dpkg-checkbuilddeps 2>&1); then
  rest=$(printf '%s\n' "$unmet" | sed -n 's/.*Unmet build dependencies: //p' |
    tr ' ' '\n' | grep -v -E '^(cargo|rustc|\(>=|1\.85\))$' | grep -v '^$' || true)
  if [ -n "$rest" ]; then
    die "missing build dependencies: $(echo $rest) (apt-get install them)"
  fi
  echo "build-deb: using $(command -v cargo) ($cargo_v) instead of Debian's cargo/rustc packages"
  bdflags=(-d)
  # debhelper points HOME elsewhere; rustup's proxies find their toolchain with RUSTUP_HOME.
  if [ -z "${RUSTUP_HOME:-}" ] && [ -d "$HOME/.rustup" ]; then
    export RUSTUP_HOME=$HOME/.rustup
  fi
fi

echo "build-deb: dpkg-buildpackage -b (meson + cargo --offline, release profile; takes minutes)"
jobs=$(nproc)
if ! (cd "$src" && DEB_BUILD_OPTIONS="parallel=$jobs ${DEB_BUILD_OPTIONS:-}" \
  dpkg-buildpackage -b -us -uc "${bdflags[@]}") >"$W/build.log" 2>&1; then
  tail -40 "$W/build.log" >&2
  die "dpkg-buildpackage failed (whole log: $W/build.log)"
fi
deb=lockwarden_${debversion}_${arch}.deb
[ -f "$W/$deb" ] || die "dpkg-buildpackage finished but made no $W/$deb"
cp "$W/$deb" "$OUT/$deb"
echo "build-deb: built $OUT/$deb"
dpkg-deb -c "$OUT/$deb" | awk '{print "build-deb:   " $1, $6}'

if [ "$LINTIAN" = 1 ]; then
  echo "build-deb: lintian $deb"
  lint=$(lintian --info --display-info --pedantic "$OUT/$deb" 2>&1) || true
  printf '%s\n' "$lint" | sed 's/^/build-deb:   /'
  if printf '%s\n' "$lint" | grep -q '^E: '; then
    die "lintian reports errors (above)"
  fi
fi
echo "$OUT/$deb"
