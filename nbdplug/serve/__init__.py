"""Serving images over NBD with nbdkit: the plugin nbdkit runs
(plugin.py), named exports and their config file (exports.py), what
nbdkit 1.32 does not do for a Python plugin (connections.py), TLS files
(tls.py), and starting and stopping nbdkit (nbdkit.py)."""
