"""Recipe: the DiffInf pipeline on one config (ingest -> noise -> train -> evaluate).

Runs unchanged locally and under `ray job submit`:

    python -m jobs.pipeline --config jobs/configs/demo.yaml [train.epochs=3 ...]
    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/tiny.yaml

Under `ray job submit` it joins the job's cluster; otherwise it starts a local Ray.
"""

from __future__ import annotations

import argparse
import sys

from diffinf_ray.cli import main as diffinf_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    return diffinf_main(["run", args.config, *args.overrides, *(["--force"] if args.force else [])])


if __name__ == "__main__":
    sys.exit(main())
