"""stasisfs: encrypted, deduplicated backups that never trust the storage side."""

__version__ = "0.1.0"
