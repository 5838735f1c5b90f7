"""Run fastconv's benchmark suite: ``python benchmarks/run.py --help``.

The suite lives in the package (``fastconv.bench``) so that ``fastconv bench`` works from an
installed wheel too; this file is the in-repository entry point.  See README.md here.
"""
import sys

from fastconv.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
