"""Thin Tornado handlers: parse, authorize, call the engine, reply."""
