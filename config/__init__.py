"""Squall settings."""
