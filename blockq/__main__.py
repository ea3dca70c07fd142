"""``python -m blockq`` runs the ``blockq`` command."""
import sys

from .cli import main

sys.exit(main())
