"""``bench/mrp_grid.py`` with fast MRP's drift forecast recorded: every unit's outlier ratio at s0 on the dense
model, in the pilot and as measured when the pruning pass reaches it, and every forecast made for it before.
``bench/drift_scores.py`` scores forecasts on these records.

    python bench/drift_trace.py --dump drift.json -- --model smollm2=GGUF --eval wikitext --sparsities 0.6 \\
        --seed 1 --nsamples 32 --seqlen 512 --max-windows 16 --keep-allocation --json run.json \\
        --run "mrp-fast batch_size=16"

Everything after ``--`` goes to mrp_grid.py (one run per process: the record is of the last fast MRP run).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from mrprune.allocate import mrp_fast


def instrument(record: dict) -> None:
    """Wrap DriftForecast so that it writes what it saw and said into ``record``."""
    cls = mrp_fast.DriftForecast
    init, observe, scale = cls.__init__, cls.observe, cls.scale

    def traced_init(self, dense, pilot, s0, *args, **kwargs):
        init(self, dense, pilot, s0, *args, **kwargs)
        record.update(x=self.x, dense=[d.outlier_ratio(s0) for d in dense],
                      pilot=[p.outlier_ratio(s0) for p in pilot], obs=[], scales=[], model=self.model)

    def traced_observe(self, index, measured, excess=0.0):
        record["obs"].append([index, measured.outlier_ratio(self.s0), list(self.fit) if self.fit else None, excess])
        observe(self, index, measured, excess)

    def traced_scale(self, index, fallback, excess=0.0):
        value = scale(self, index, fallback, excess)
        record["scales"].append([len(record["obs"]), index, value, fallback, excess])  # made after len(obs) units
        return value

    cls.__init__, cls.observe, cls.scale = traced_init, traced_observe, traced_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", required=True, help="where the record goes (JSON)")
    parser.add_argument("grid", nargs=argparse.REMAINDER, help="-- then bench/mrp_grid.py's arguments")
    args = parser.parse_args()
    record: dict = {}
    instrument(record)
    sys.argv = ["mrp_grid.py", *[a for a in args.grid if a != "--"]]
    try:
        runpy.run_path(str(Path(__file__).with_name("mrp_grid.py")), run_name="__main__")
    finally:
        Path(args.dump).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
