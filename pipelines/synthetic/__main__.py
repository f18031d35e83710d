"""`python -m pipelines.synthetic --preset tiny --seed 0 --out RAW_DIR [--set name=value ...]`."""

from pipelines.synthetic.writer import main

raise SystemExit(main())
