(*
Module: Libvirt_lockwardend
  Parses /etc/libvirt/lockwardend.conf, the configuration of lockwarden's per-host daemon.

About: Syntax
  libvirt's configuration syntax as lockwarden uses it: one "key = value" per line, strings in
  double quotes, integers, "#" comments on their own line or after a value. The lens accepts
  exactly the keys lockwardend accepts and, for each key, the values lockwardend accepts
  written in their canonical form: absolute paths in double quotes, integers in decimal
  without sign or leading zeros within the key's range, log levels as listed. Every value the
  lens accepts, lockwardend accepts (tests/claims.rs checks this against the real daemon).
  lockwardend also reads forms the lens refuses: single or triple quotes, a sign, leading
  zeros, a ";" after the value.

About: License
  LGPL-2.1-or-later, like lockwarden.
*)
module Libvirt_lockwardend =
   autoload xfm

   let value_sep = del /[ \t]*=[ \t]*/ " = "
   let indent    = del /[ \t]*/ ""

   let quoted (r:regexp) = del "\"" "\"" . store r . del "\"" "\""

   (* Values, as the daemon's parser (src/daemon/settings.rs) accepts them *)
   let abs_path          = /\/[^\"\n]*/
   let int_0_600000      = /0|[1-9][0-9]{0,4}|[1-5][0-9]{5}|600000/
   let int_1_65536       = /[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-6]/
   let int_1_1000000     = /[1-9][0-9]{0,5}|1000000/
   let int_100_3600000   = /[1-9][0-9]{2,5}|[12][0-9]{6}|3[0-5][0-9]{5}|3600000/
   let int_0_86400000    = /0|[1-9][0-9]{0,6}|[1-7][0-9]{7}|8[0-5][0-9]{6}|86[0-3][0-9]{5}|86400000/

   (* A trailing comment becomes a "#comment" child of its setting. *)
   let eol = Util.comment_or_eol

   let str_entry  (kw:string) (r:regexp) = [ key kw . value_sep . quoted r . eol ]
   let bare_entry (kw:string) (r:regexp) = [ key kw . value_sep . store r . eol ]

   let socket_entry = str_entry "socket" abs_path
                    | str_entry "admin_socket" abs_path
                    | str_entry "pid_file" abs_path
                    | str_entry "lease_dir" abs_path
                    | str_entry "watchdog_device" abs_path

   let limit_entry = bare_entry "max_clients" int_1_1000000
                   | bare_entry "kill_grace_ms" int_0_600000
                   | bare_entry "storage_timeout_ms" int_100_3600000
                   | bare_entry "lease_check_interval_ms" int_0_86400000
                   | bare_entry "heartbeat_interval_ms" int_0_600000
                   | bare_entry "fence_after_ms" int_100_3600000
                   | bare_entry "max_owners" int_1_1000000
                   | bare_entry "max_leases_per_request" int_1_65536
                   | bare_entry "request_read_timeout_ms" int_100_3600000
                   | bare_entry "idle_timeout_ms" int_0_86400000

   let logging_entry = str_entry "log_level" /error|warn|info|debug/

   let entry = socket_entry | limit_entry | logging_entry

   let record = indent . entry

   let lns = ( record | Util.comment | Util.empty ) *

   let filter = incl "/etc/libvirt/lockwardend.conf"
              . Util.stdexcl

   let xfm = transform lns filter
