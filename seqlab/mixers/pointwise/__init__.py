"""Per-token mixers (no token mixing): Activator."""
