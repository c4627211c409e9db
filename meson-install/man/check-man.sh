#!/bin/sh
# meson test: a man page must render with man(1) without a single warning.
#   check-man.sh PAGE
set -eu
page=$1
out=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings=w -E UTF-8 -l "$page" 2>&1 >/dev/null) || {
    echo "man -l $page failed:" >&2
    printf '%s\n' "$out" >&2
    exit 1
}
if [ -n "$out" ]; then
    echo "man -l $page printed warnings:" >&2
    printf '%s\n' "$out" >&2
    exit 1
fi
# The rendered page must have its NAME section (a page that renders empty is broken too).
LC_ALL=C.UTF-8 MANWIDTH=80 man -E UTF-8 -l "$page" 2>/dev/null | grep -q '^NAME' || {
    echo "man -l $page rendered no NAME section" >&2
    exit 1
}
