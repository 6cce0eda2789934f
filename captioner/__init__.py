"""captioner: the application core (settings, database, storage, decoding, jobs, CLI)."""

__version__ = "0.1.0"
