#!/usr/bin/env python3
"""Research report over many run folders (src/report/build.py).

    python scripts/generate_research_report.py --input-dirs results/ more_results/ \
        --output reports/summary --format md,html
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.report.build import main  # noqa: E402

raise SystemExit(main())
