"""
Integration tests: real PostgreSQL, real sockets, real C{twistd} processes.
"""
