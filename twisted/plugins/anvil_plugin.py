"""
The C{twistd anvil} plugin: names the module that builds an Anvil node.

This file stays tiny so C{twistd --help} never imports Anvil itself.
"""

from twisted.application.service import ServiceMaker

anvil = ServiceMaker(
    "Anvil",
    "anvil.tap",
    "Anvil S3-compatible object store node",
    "anvil",
)
