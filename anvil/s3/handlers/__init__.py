# -*- test-case-name: tests.test_s3_dispatch -*-
"""
S3 operation handlers: L{bucket} (service and bucket level), L{object} and
L{multipart}. Each handler is C{async def handler(call: S3Call) ->
S3Response}; see L{anvil.s3.dispatch} for the contract and the table that
routes requests to them.
"""
