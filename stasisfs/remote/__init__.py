"""Everything that talks to a stasisfs-server: the HTTP client, this device's remotes, sync, accounts, lazy packs."""
