"""txmail's relay: authenticated submission, a durable spool, delivery from a dedicated IP."""
