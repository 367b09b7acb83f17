"""artplug's built-in technique plugins (import name ``artplug_plugins``), one module per paper.

They are registered through the ``artplug`` entry-point group exactly like third-party
packages, and import only the public ``artplug`` package root.
"""
