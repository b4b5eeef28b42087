from src.study.cli import main

raise SystemExit(main())
