#!/usr/bin/env python3
"""Throughput of the tool's hot paths against the same model's bare ceilings (src/bench).

    python scripts/benchmark.py --model random:llama-3.1-8b --dtype bfloat16 \
        --batch-size 8 --max-length 512 --json results/bench.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.bench.cli import main  # noqa: E402

raise SystemExit(main())
