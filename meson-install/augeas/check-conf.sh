#!/bin/sh
# meson test: every setting a shipped config file documents (the "#key = value" lines),
# uncommented, must parse with the augeas lens into exactly those keys and values. This keeps
# the config files, their documented defaults and the lenses in step.
#
#   check-conf.sh AUGPARSE LENS_DIR LENS_MODULE_FILE_BASENAME CONF_FILE WORK_DIR
set -eu
augparse=$1 lensdir=$2 lens=$3 conf=$4 work=$5

# libvirt_lockwarden -> Libvirt_lockwarden
module=$(printf '%s' "$lens" | sed 's/^./\U&/')
test_file="$work/test_shipped_$lens.aug"

settings=$(sed -n 's/^#\([a-z_][a-z_]*\) = \(.*\)$/\1 = \2/p' "$conf")
if [ -z "$settings" ]; then
    echo "$conf documents no settings (expected lines like '#key = value')" >&2
    exit 1
fi

{
    printf 'module Test_shipped_%s =\n' "$lens"
    printf '   let conf = "'
    printf '%s\n' "$settings" | sed 's/\\/\\\\/g; s/"/\\"/g'
    printf '"\n\n   test %s.lns get conf =\n' "$module"
    printf '%s\n' "$settings" | while IFS= read -r line; do
        k=${line%% = *}
        v=${line#* = }
        v=${v#\"}
        v=${v%\"}
        printf '      { "%s" = "%s" }\n' "$k" "$v"
    done
} >"$test_file"

echo "checking the settings documented in $conf against lens $module ($test_file):"
printf '%s\n' "$settings" | sed 's/^/  /'
exec "$augparse" -I "$lensdir" "$test_file"
