(*
Module: Libvirt_lockwarden
  Parses the lockwarden lock-manager plugin configuration of libvirt's drivers:
  /etc/libvirt/qemu-lockwarden.conf and /etc/libvirt/libxl-lockwarden.conf

About: Syntax
  libvirt's configuration syntax as lockwarden uses it: one "key = value" per line, strings in
  double quotes, booleans 0 or 1, integers, "#" comments on their own line or after a value.
  The lens accepts exactly the keys the plugin accepts (an unknown key is an error for the
  plugin too) and, for each key, the values the plugin accepts written in their canonical form:
  absolute paths in double quotes (daemon_socket at most 107 bytes), booleans 0 or 1, integers
  in decimal without sign or leading zeros within the key's range, choices as listed. Every
  value the lens accepts, the plugin accepts (tests/claims.rs checks this against the real
  parser). The plugin also reads forms the lens refuses: single or triple quotes, a sign,
  leading zeros, a ";" after the value.

About: License
  LGPL-2.1-or-later, like lockwarden.
*)
module Libvirt_lockwarden =
   autoload xfm

   let value_sep = del /[ \t]*=[ \t]*/ " = "
   let indent    = del /[ \t]*/ ""

   let quoted (r:regexp) = del "\"" "\"" . store r . del "\"" "\""

   (* Values, as the plugin's parser (src/plugin_conf.rs) accepts them *)
   let abs_path    = /\/[^\"\n]*/
   (* A Unix socket address holds at most 107 bytes and a NUL *)
   let socket_path = /\/[^\"\n]{0,106}/
   let bool_re     = /0|1/
   (* request_timeout_ms: 1 to 3600000 *)
   let ms_1_3600000 = /[1-9][0-9]{0,5}|[12][0-9]{6}|3[0-5][0-9]{5}|3600000/

   (* A trailing comment becomes a "#comment" child of its setting. *)
   let eol = Util.comment_or_eol

   let str_entry  (kw:string) (r:regexp) = [ key kw . value_sep . quoted r . eol ]
   let bare_entry (kw:string) (r:regexp) = [ key kw . value_sep . store r . eol ]

   (* The keys lockd's qemu-lockd.conf has, with lockd's meaning *)
   let lockd_entry = bare_entry "auto_disk_leases" bool_re
                   | bare_entry "require_lease_for_disks" bool_re
                   | str_entry "file_lockspace_dir" abs_path
                   | str_entry "lvm_lockspace_dir" abs_path
                   | str_entry "scsi_lockspace_dir" abs_path

   (* lockwarden's own keys *)
   let lockwarden_entry = str_entry "daemon_socket" socket_path
                        | bare_entry "request_timeout_ms" ms_1_3600000
                        | str_entry "readonly_disks" /shared|ignore/

   let entry = lockd_entry | lockwarden_entry

   let record = indent . entry

   let lns = ( record | Util.comment | Util.empty ) *

   let filter = incl "/etc/libvirt/qemu-lockwarden.conf"
              . incl "/etc/libvirt/libxl-lockwarden.conf"
              . Util.stdexcl

   let xfm = transform lns filter
