"""``python -m artplug``: the same as the ``artplug`` command."""

from artplug.cli import main

main()
