"""Anvil scripts package."""
