"""Operating-system helpers: file metadata, worker pools, XDG paths, the mount table, crash points for tests."""
