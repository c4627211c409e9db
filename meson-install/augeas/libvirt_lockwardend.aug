(*
Module: Libvirt_lockwardend
  Parses /etc/libvirt/lockwardend.conf, the configuration of lockwarden's per-host daemon.

About: Syntax
  libvirt's configuration syntax as lockwarden uses it: one "key = value" per line, strings in
  double quotes, integers, "#" comments on their own line or after a value. The lens accepts
  exactly the keys lockwardend accepts.

About: License
  LGPL-2.1-or-later, like lockwarden.
*)
module Libvirt_lockwardend =
   autoload xfm

   let value_sep = del /[ \t]*=[ \t]*/ " = "
   let indent    = del /[ \t]*/ ""

   let quoted (r:regexp) = del "\"" "\"" . store r . del "\"" "\""
   let str_val   = quoted /[^\"\n]*/
   let uint_val  = store /[0-9]+/

   (* A trailing comment becomes a "#comment" child of its setting. *)
   let eol = Util.comment_or_eol

   let str_entry    (kw:string)            = [ key kw . value_sep . str_val . eol ]
   let uint_entry   (kw:string)            = [ key kw . value_sep . uint_val . eol ]
   let choice_entry (kw:string) (r:regexp) = [ key kw . value_sep . quoted r . eol ]

   let socket_entry = str_entry "socket"
                    | str_entry "admin_socket"
                    | str_entry "pid_file"
                    | str_entry "lease_dir"

   let limit_entry = uint_entry "max_clients"
                   | uint_entry "kill_grace_ms"
                   | uint_entry "storage_timeout_ms"
                   | uint_entry "lease_check_interval_ms"
                   | uint_entry "max_owners"
                   | uint_entry "max_leases_per_request"
                   | uint_entry "request_read_timeout_ms"
                   | uint_entry "idle_timeout_ms"

   let logging_entry = choice_entry "log_level" /error|warn|info|debug/

   let entry = socket_entry | limit_entry | logging_entry

   let record = indent . entry

   let lns = ( record | Util.comment | Util.empty ) *

   let filter = incl "/etc/libvirt/lockwardend.conf"
              . Util.stdexcl

   let xfm = transform lns filter
