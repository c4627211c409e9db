(*
Module: Libvirt_lockwarden
  Parses the lockwarden lock-manager plugin configuration of libvirt's drivers:
  /etc/libvirt/qemu-lockwarden.conf and /etc/libvirt/libxl-lockwarden.conf

About: Syntax
  libvirt's configuration syntax as lockwarden uses it: one "key = value" per line, strings in
  double quotes, booleans 0 or 1, integers, "#" comments on their own line or after a value.
  The lens accepts exactly the keys lockwarden accepts (an unknown key is an error for the
  plugin too), and for booleans and choices only the values the plugin accepts.

About: License
  LGPL-2.1-or-later, like lockwarden.
*)
module Libvirt_lockwarden =
   autoload xfm

   let value_sep = del /[ \t]*=[ \t]*/ " = "
   let indent    = del /[ \t]*/ ""

   let quoted (r:regexp) = del "\"" "\"" . store r . del "\"" "\""
   let str_val   = quoted /[^\"\n]*/
   let bool_val  = store /0|1/
   let uint_val  = store /[0-9]+/

   (* A trailing comment becomes a "#comment" child of its setting. *)
   let eol = Util.comment_or_eol

   let str_entry    (kw:string)            = [ key kw . value_sep . str_val . eol ]
   let bool_entry   (kw:string)            = [ key kw . value_sep . bool_val . eol ]
   let uint_entry   (kw:string)            = [ key kw . value_sep . uint_val . eol ]
   let choice_entry (kw:string) (r:regexp) = [ key kw . value_sep . quoted r . eol ]

   (* The keys lockd's qemu-lockd.conf has, with lockd's meaning *)
   let lockd_entry = bool_entry "auto_disk_leases"
                   | bool_entry "require_lease_for_disks"
                   | str_entry "file_lockspace_dir"
                   | str_entry "lvm_lockspace_dir"
                   | str_entry "scsi_lockspace_dir"

   (* lockwarden's own keys *)
   let lockwarden_entry = str_entry "daemon_socket"
                        | uint_entry "request_timeout_ms"
                        | choice_entry "readonly_disks" /shared|ignore/

   let entry = lockd_entry | lockwarden_entry

   let record = indent . entry

   let lns = ( record | Util.comment | Util.empty ) *

   let filter = incl "/etc/libvirt/qemu-lockwarden.conf"
              . incl "/etc/libvirt/libxl-lockwarden.conf"
              . Util.stdexcl

   let xfm = transform lns filter
