"""``python -m shoal.chaos``: the ``shoal chaos`` command alone."""

from shoal.chaos.cli import main

main()
