"""Anvil storage package."""
