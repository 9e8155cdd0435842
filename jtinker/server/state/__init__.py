"""Durable server state (SQLite)."""

from jtinker.server.state.db import Database, open_database

__all__ = ["Database", "open_database"]
