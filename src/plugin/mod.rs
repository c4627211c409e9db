//! Plugin (placeholder until the plugin lands).
