#!/usr/bin/env python3
"""Regenerate kwatt's dashboards and rules; see kwatt_dashboards/cli.py for the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kwatt_dashboards.cli import main

if __name__ == "__main__":
    sys.exit(main())
