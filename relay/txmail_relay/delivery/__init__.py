"""Outbound delivery: the queue with its retries, and the SMTP transport."""
