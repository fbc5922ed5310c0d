"""Anvil worker package."""
