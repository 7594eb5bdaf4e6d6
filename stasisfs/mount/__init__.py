"""The read-only FUSE mount: the pure filesystem model (vfs), the pyfuse3 adapter and the mount's lifecycle."""
