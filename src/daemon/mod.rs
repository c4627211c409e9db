//! Daemon (placeholder until the daemon lands).
