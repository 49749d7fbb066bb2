"""Webhook deliveries: the events of each subscription, signed (Standard Webhooks), in order."""
