#!/usr/bin/env python3
"""Critical Weight Analysis: see README.md or run with --help."""
from src.cli import main

raise SystemExit(main())
