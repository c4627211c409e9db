(* Tests for the Libvirt_lockwardend lens (lockwardend.conf) *)
module Test_libvirt_lockwardend =

   let conf = "# lockwardend settings
socket = \"/run/lockwarden/lockwardend.sock\"
admin_socket = \"/run/lockwarden/lockwardend-admin.sock\"
pid_file = \"/run/lockwarden/lockwardend.pid\"

max_clients = 4096
  kill_grace_ms=3000
storage_timeout_ms = 25000
lease_check_interval_ms = 0
heartbeat_interval_ms = 5000
fence_after_ms = 60000
max_owners = 100
max_leases_per_request = 64
request_read_timeout_ms = 10000
idle_timeout_ms = 0
lease_dir = \"/var/lib/libvirt/lockwarden/leases\"
watchdog_device = \"/dev/watchdog\"
log_level = \"debug\"   # while investigating
"

   test Libvirt_lockwardend.lns get conf =
      { "#comment" = "lockwardend settings" }
      { "socket" = "/run/lockwarden/lockwardend.sock" }
      { "admin_socket" = "/run/lockwarden/lockwardend-admin.sock" }
      { "pid_file" = "/run/lockwarden/lockwardend.pid" }
      { }
      { "max_clients" = "4096" }
      { "kill_grace_ms" = "3000" }
      { "storage_timeout_ms" = "25000" }
      { "lease_check_interval_ms" = "0" }
      { "heartbeat_interval_ms" = "5000" }
      { "fence_after_ms" = "60000" }
      { "max_owners" = "100" }
      { "max_leases_per_request" = "64" }
      { "request_read_timeout_ms" = "10000" }
      { "idle_timeout_ms" = "0" }
      { "lease_dir" = "/var/lib/libvirt/lockwarden/leases" }
      { "watchdog_device" = "/dev/watchdog" }
      { "log_level" = "debug"
        { "#comment" = "while investigating" } }

   test Libvirt_lockwardend.lns put "max_clients = 4096\n" after
      set "max_clients" "8192";
      set "log_level" "warn"
   = "max_clients = 8192\nlog_level = \"warn\"\n"

   test Libvirt_lockwardend.lns get "log_level = \"verbose\"\n" = *
   test Libvirt_lockwardend.lns get "max_clients = \"many\"\n" = *
   test Libvirt_lockwardend.lns get "auto_disk_leases = 1\n" = *
   test Libvirt_lockwardend.lns get "max_clients = 0\n" = *
   test Libvirt_lockwardend.lns get "max_leases_per_request = 65537\n" = *
   test Libvirt_lockwardend.lns get "storage_timeout_ms = 99\n" = *
   test Libvirt_lockwardend.lns get "kill_grace_ms = -1\n" = *
   test Libvirt_lockwardend.lns get "heartbeat_interval_ms = 600001\n" = *
   test Libvirt_lockwardend.lns get "fence_after_ms = 99\n" = *
   test Libvirt_lockwardend.lns get "pid_file = \"run/x.pid\"\n" = *
   test Libvirt_lockwardend.lns get "idle_timeout_ms = 86400000\n" = { "idle_timeout_ms" = "86400000" }
