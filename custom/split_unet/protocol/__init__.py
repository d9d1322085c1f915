"""NVFlare glue: wire format, the server's Controller, the sites' Executor, site-local settings."""
