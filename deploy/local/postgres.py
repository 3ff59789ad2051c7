"""PostgreSQL for the local cluster: the same throwaway-server runner the tests use.

``PostgresServer(directory)`` runs Debian's PostgreSQL on 127.0.0.1 at a free port with its
data under ``directory`` (as the ``postgres`` user when we are root). See tests/postgres.py.
"""

from tests.postgres import PostgresServer, PostgresUnavailable, find_bin_dir

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bin_dir"]
