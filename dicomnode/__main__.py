"""``python -m dicomnode`` runs the CLI."""

from __future__ import annotations

import sys

from dicomnode.cli.main import main

# Guarded: receiver processes are spawned, and spawning imports this module again.
if __name__ == "__main__":
    sys.exit(main())
