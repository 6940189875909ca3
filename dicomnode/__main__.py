"""``python -m dicomnode`` runs the CLI."""

from __future__ import annotations

import sys

from dicomnode.cli.main import main

sys.exit(main())
