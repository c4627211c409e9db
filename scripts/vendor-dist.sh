#!/usr/bin/env bash
# Make a source tarball of lockwarden that builds with no network: the sources plus every crate
# they need (cargo vendor), with .cargo/config.toml pointing cargo at the vendored copies.
#
#   bash scripts/vendor-dist.sh [--out DIR] [--head] [--check]
#
#   --out DIR  where to write lockwarden-VERSION.tar.xz (default: dist/ in the repository)
#   --head     take the sources from the last commit (git archive HEAD) instead of the work
#              tree (tracked and untracked files, minus what .gitignore excludes)
#   --check    afterwards, unpack the tarball and build it with meson -Doffline=true, with an
#              empty CARGO_HOME and (when unshare works) no network at all
#
# Building from the tarball (what --check does), on a machine without network access:
#   tar xf lockwarden-VERSION.tar.xz && cd lockwarden-VERSION
#   meson setup build meson-install -Doffline=true --prefix=/usr --sysconfdir=/etc
#   meson compile -C build && meson install -C build        # or: DESTDIR=... meson install
# or with cargo alone: cargo build --release --locked --offline
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/dist
FROM_HEAD=0
CHECK=0
while [ $# -gt 0 ]; do
  case $1 in
  --out)
    OUT=$2
    shift
    ;;
  --head) FROM_HEAD=1 ;;
  --check) CHECK=1 ;;
  -h | --help)
    sed -n '2,20p' "$0"
    exit 0
    ;;
  *)
    echo "vendor-dist: unknown argument $1 (see --help)" >&2
    exit 2
    ;;
  esac
  shift
done

die() {
  echo "vendor-dist: $*" >&2
  exit 1
}
command -v cargo >/dev/null || die "cargo not found"
command -v git >/dev/null || die "git not found"
git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$ROOT is not a git work tree"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -1)
[ -n "$version" ] || die "no version = \"...\" line in $ROOT/Cargo.toml"
name=lockwarden-$version
tmp=$(mktemp -d /tmp/lockwarden-dist.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/$name
mkdir -p "$stage" "$OUT"
OUT=$(cd "$OUT" && pwd)
# Like meson's build directories: the default output directory keeps itself out of git.
if [ "$OUT" = "$ROOT/dist" ] && [ ! -e "$OUT/.gitignore" ]; then
  printf '*\n' >"$OUT/.gitignore"
fi

echo "vendor-dist: collecting the sources"
if [ "$FROM_HEAD" = 1 ]; then
  git -C "$ROOT" archive --format=tar HEAD | tar -x -C "$stage"
else
  # Tracked and untracked files that .gitignore does not exclude, and that still exist.
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf -) | tar -x -C "$stage"
fi
[ -f "$stage/Cargo.lock" ] || die "Cargo.lock is missing from the sources: a vendored build needs it"
rm -rf "$stage/vendor"

echo "vendor-dist: cargo vendor (every crate Cargo.lock names, for every platform)"
cargo vendor --locked --versioned-dirs --manifest-path "$stage/Cargo.toml" "$stage/vendor" \
  >/dev/null 2>"$tmp/vendor.log" || { tail -20 "$tmp/vendor.log" >&2; die "cargo vendor failed"; }

mkdir -p "$stage/.cargo"
cat >>"$stage/.cargo/config.toml" <<'EOF'

# Added by scripts/vendor-dist.sh: build from the crates in vendor/, never from the network.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
EOF

tarball=$OUT/$name.tar.xz
echo "vendor-dist: writing $tarball"
epoch=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
  -C "$tmp" -cf - "$name" | xz -T0 -6 >"$tarball.part"
mv "$tarball.part" "$tarball"
echo "vendor-dist: $(du -h "$tarball" | cut -f1) $tarball ($(find "$stage/vendor" -mindepth 1 -maxdepth 1 | wc -l) vendored crates)"

if [ "$CHECK" = 1 ]; then
  echo "vendor-dist: --check: building the unpacked tarball offline"
  check=$tmp/check
  mkdir -p "$check/cargo-home"
  tar -xJf "$tarball" -C "$check"
  # shellcheck disable=SC2016 # $1/$2 expand in the inner shell
  build_cmd=(bash -c 'set -e
    cd "$1"
    meson setup build meson-install -Doffline=true --prefix=/usr --sysconfdir=/etc
    meson compile -C build
    DESTDIR="$2" meson install -C build --quiet' check "$check/$name" "$check/dest")
  # An empty CARGO_HOME: nothing from this machine's registry cache can help. No network
  # namespace access either, when unshare can make one (root). Without one, the build runs
  # with cargo --offline and an empty CARGO_HOME only, and the result says exactly that.
  if unshare -n true 2>/dev/null; then
    isolated=1
    echo "vendor-dist: (building in a network namespace with no interfaces up)"
    CARGO_HOME=$check/cargo-home unshare -n "${build_cmd[@]}" >"$check/build.log" 2>&1 ||
      { tail -30 "$check/build.log" >&2; die "the tarball does not build offline"; }
  else
    isolated=0
    echo "vendor-dist: WARNING: 'unshare -n' failed (it needs root or user namespaces): the" \
      "check build can reach the network; only cargo --offline and an empty CARGO_HOME keep" \
      "it offline. Run --check as root to build with no network at all." >&2
    CARGO_HOME=$check/cargo-home "${build_cmd[@]}" >"$check/build.log" 2>&1 ||
      { tail -30 "$check/build.log" >&2; die "the tarball does not build offline"; }
  fi
  [ -x "$check/dest/usr/sbin/lockwardend" ] || die "offline build installed no lockwardend"
  if [ "$isolated" = 1 ]; then
    echo "vendor-dist: --check passed: the tarball builds and installs with no network"
  else
    echo "vendor-dist: --check passed: the tarball builds and installs with cargo --offline" \
      "and an empty CARGO_HOME (the network was NOT isolated: 'unshare -n' failed)"
  fi
fi

cat <<EOF

Build it on a machine without network access (needs Rust >= 1.85, meson, ninja, clang/libclang):
  tar xf $name.tar.xz && cd $name
  meson setup build meson-install -Doffline=true --prefix=/usr --sysconfdir=/etc
  meson compile -C build
  meson install -C build            # as root; or DESTDIR=/some/stage meson install -C build
EOF
