"""Pure formats and models: crypto, packs, trees, snapshots, key slots, chunking, retention. No I/O."""
