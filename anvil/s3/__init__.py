"""Anvil s3 package."""
