"""txmail's relay: authenticated SMTP submission, a durable spool and delivery from a dedicated IP."""
