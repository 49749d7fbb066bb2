"""Mail as data: MIME building, header parsing and address checks (no I/O)."""
