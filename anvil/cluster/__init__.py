"""Anvil cluster package."""
