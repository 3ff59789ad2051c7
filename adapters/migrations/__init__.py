"""Alembic migrations of Tailor's metadata database (run by ``adapters.schema.create_schema``).

``versions/`` holds one module per revision, each frozen: a revision never imports the live
``adapters.schema.metadata``, so it keeps describing the schema as it was when written. A new
schema change is a new revision here plus the matching change to ``adapters.schema``;
``tests/test_migrations.py`` fails while the two disagree.
"""
