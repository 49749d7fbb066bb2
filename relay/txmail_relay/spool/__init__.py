"""The durable spool: a segment log with group commit, and its recovery."""
