"""Studies of many runs: python scripts/run_study.py plan|status|run|report STUDY.yaml (see
src/study/cli.py), from any folder."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.study.cli import main  # noqa: E402

raise SystemExit(main())
