"""Anvil meta package."""
