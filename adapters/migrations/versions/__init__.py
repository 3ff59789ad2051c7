"""Alembic revision modules (a package so a regular install carries them)."""
