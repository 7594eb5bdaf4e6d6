"""The local repository: atomic object files, the LMDB index, packs being written, locks, tree reading."""
