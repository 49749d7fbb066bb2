"""Relay fixtures live in relaykit.py (importable by tests); registered here."""

from relay.relaykit import b_password, env, sink, sink_factory, tls_files

__all__ = ["b_password", "env", "sink", "sink_factory", "tls_files"]
