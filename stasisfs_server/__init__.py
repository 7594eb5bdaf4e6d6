"""stasisfs-server: stores opaque, content-addressed objects for users' devices.

It holds no keys and learns nothing but object counts, padded sizes and upload
times. Layers: `stores/` (bytes), `db` (accounts and the object catalog),
`service` (the rules), `app` (HTTP), `cli` (administration and `serve`).
"""
