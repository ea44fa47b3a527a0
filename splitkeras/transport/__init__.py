"""Transports that carry messages between parties."""
