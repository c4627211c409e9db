(* Tests for the Libvirt_lockwarden lens (qemu-lockwarden.conf, libxl-lockwarden.conf) *)
module Test_libvirt_lockwarden =

   let conf = "# lockwarden plugin settings
#
auto_disk_leases = 0
require_lease_for_disks = 1

file_lockspace_dir = \"/var/lib/libvirt/lockwarden/files\"
lvm_lockspace_dir = \"/var/lib/libvirt/lockwarden/lvmvolumes\"
scsi_lockspace_dir = \"/var/lib/libvirt/lockwarden/scsivolumes\"
  daemon_socket=\"/run/lockwarden/lockwardend.sock\"
request_timeout_ms = 30000   # thirty seconds
readonly_disks = \"ignore\"
"

   test Libvirt_lockwarden.lns get conf =
      { "#comment" = "lockwarden plugin settings" }
      { }
      { "auto_disk_leases" = "0" }
      { "require_lease_for_disks" = "1" }
      { }
      { "file_lockspace_dir" = "/var/lib/libvirt/lockwarden/files" }
      { "lvm_lockspace_dir" = "/var/lib/libvirt/lockwarden/lvmvolumes" }
      { "scsi_lockspace_dir" = "/var/lib/libvirt/lockwarden/scsivolumes" }
      { "daemon_socket" = "/run/lockwarden/lockwardend.sock" }
      { "request_timeout_ms" = "30000"
        { "#comment" = "thirty seconds" } }
      { "readonly_disks" = "ignore" }

   (* Changing a value keeps the rest of the file as it was. *)
   test Libvirt_lockwarden.lns put "auto_disk_leases = 1\n# keep me\n" after
      set "auto_disk_leases" "0";
      set "file_lockspace_dir" "/srv/locks"
   = "auto_disk_leases = 0\n# keep me\nfile_lockspace_dir = \"/srv/locks\"\n"

   (* What the plugin refuses, the lens refuses. *)
   test Libvirt_lockwarden.lns get "auto_disk_leases = 2\n" = *
   test Libvirt_lockwarden.lns get "readonly_disks = \"maybe\"\n" = *
   test Libvirt_lockwarden.lns get "request_timeout_ms = \"fast\"\n" = *
   test Libvirt_lockwarden.lns get "file_lockspace_dri = \"/x\"\n" = *
   test Libvirt_lockwarden.lns get "request_timeout_ms = 0\n" = *
   test Libvirt_lockwarden.lns get "request_timeout_ms = 3600001\n" = *
   test Libvirt_lockwarden.lns get "request_timeout_ms = 030\n" = *
   test Libvirt_lockwarden.lns get "file_lockspace_dir = \"relative/dir\"\n" = *
   test Libvirt_lockwarden.lns get "daemon_socket = \"/sssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss\"\n" = *
   test Libvirt_lockwarden.lns get "daemon_socket = \"/ssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss\"\n" = { "daemon_socket" = "/ssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss" }

