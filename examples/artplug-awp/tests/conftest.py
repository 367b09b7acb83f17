"""artplug's fixtures (``plugin_set``, ``run_tmp``) for the AWP plugin's tests."""

pytest_plugins = ["artplug.testing"]
