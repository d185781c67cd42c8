"""session-api: payment sessions, the per-account limit, status reads, cleanup, stats."""
