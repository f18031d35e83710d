"""DARE's variants on the demo world, beside the demo's own runs (after `ctr demo --out DIR`).

DARE (Feng et al., ICLR 2025) separates the attention embeddings from the representation embeddings, and shows the
attention tables can be narrower. For each backbone this trains, with the demo's budget and settings (`DEMO_SETS`,
seed 0), ``<backbone>_dare`` (attention tables as wide as the representation, ``embedding_dim`` 16) and
``<backbone>_dare_att4`` (attention tables 4 wide) into ``DIR/runs``, evaluates them on the test split, then runs
`benchmarks/quality.py`, whose DARE checks compare each variant with its backbone's demo run (paired bootstrap over
users) and the narrow tables with the full width. Quality only: the backbones' runs come from the demo, another
run, so no speed is compared here (DARE's "faster search" with narrow tables would need `benchmarks/train.py`).

    python benchmarks/dare.py --demo out/demo [--backbones din,sim_soft,dien]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.main import DEMO_SETS  # noqa: E402

VARIANTS = {"_dare": ["model.dare=true"], "_dare_att4": ["model.dare=true", "model.dare_att_dim=4"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True, help="the --out directory of `ctr demo` (its data and runs)")
    p.add_argument("--backbones", default="din,sim_soft,dien")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "demo-quality.json"))
    args = p.parse_args()
    demo = Path(args.demo)
    ctr = [sys.executable, "-m", "cli.main"]
    for backbone in args.backbones.split(","):
        for suffix, sets in VARIANTS.items():
            run = demo / "runs" / (backbone + suffix)
            if (run / "metrics.json").exists():
                continue
            cmd = [*ctr, "train", "--data", str(demo / "data"), "--model", backbone, "--out", str(run), "--overwrite"]
            for s in [*DEMO_SETS, *sets]:
                cmd += ["--set", s]
            subprocess.run(cmd, check=True, cwd=ROOT)
            subprocess.run([*ctr, "evaluate", "--run", str(run)], check=True, cwd=ROOT)
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--demo", str(demo), "--results", args.results],
        check=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
