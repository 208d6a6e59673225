"""Introspection-caching reverse proxy for Authlete."""

__version__ = "0.1.0"
