"""``python -m shoal.loadgen``: the ``shoal bench`` command alone."""

import os

from shoal.loadgen.cli import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
main()
