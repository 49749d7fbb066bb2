"""Relay fixtures live in relaykit.py (importable by tests); registered here."""

from relay.relaykit import env, sink, sink_factory, tls_files

__all__ = ["env", "sink", "sink_factory", "tls_files"]
