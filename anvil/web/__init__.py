"""Anvil web package."""
