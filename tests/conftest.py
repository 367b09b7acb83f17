"""Shared fixtures come from artplug.testing, the same helpers third-party plugins use."""

pytest_plugins = ["artplug.testing"]
