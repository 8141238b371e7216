"""The command line every job shares: `--config <yaml> [a.b=value ...]`.

    python ray_jobs/<job>.py --config ray_jobs/configs/<job>/local.yaml [key=value ...]
    ray job submit --working-dir . -- python ray_jobs/<job>.py --config ... [key=value ...]
    python ray_jobs/<job>.py --help            # every config key, its type, default and meaning

The config is parsed and validated before Ray starts; the job then prints its manifest table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from workloads.common.config import ConfigError, JobConfig, describe_fields, load_config
from workloads.common.manifest import JobFailed, JobManifest
from workloads.common.storage import InputNotFoundError

C = TypeVar("C", bound=JobConfig)

EXIT_CONFIG = 2
EXIT_JOB_FAILED = 3


def _fields_epilog(model: type[JobConfig]) -> str:
    rows = describe_fields(model)
    width = max(len(k) for k, *_ in rows)
    lines = ["config keys (set in the YAML or as key=value overrides):"]
    for key, type_name, default, description in rows:
        lines.append(f"  {key:<{width}}  {type_name} = {default}")
        if description:
            lines.append(f"  {'':<{width}}    {description}")
    return "\n".join(lines)


def run_job(
    model: type[C],
    run: Callable[[C], JobManifest],
    argv: Sequence[str] | None = None,
    description: str | None = None,
) -> int:
    parser = argparse.ArgumentParser(
        description=description,
        epilog=_fields_epilog(model),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (see ray_jobs/configs/)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. output.path=/tmp/x",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(model, args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    try:
        manifest = run(cfg)
    except (InputNotFoundError, ConfigError) as exc:  # a config that only the data shows is bad
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    print(manifest.summary_table())
    return 0
