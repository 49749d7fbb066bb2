"""Compose and accept a message: template sends from the API and from SMTP."""
