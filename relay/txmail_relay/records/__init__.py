"""The relay's SQLite records: sends, events, contacts, suppressions and stats."""
