"""Brokers: where events get ids, are retained, and reach every node."""
