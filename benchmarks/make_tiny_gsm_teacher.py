"""Pretrain the tiny-gsm teacher and write it to the package assets (or --output).

    PYTHONPATH=src python benchmarks/make_tiny_gsm_teacher.py --output src/selfmtp/assets/tiny-gsm-teacher

Any TeacherConfig field can be overridden: --steps 1200 --hidden 96 --lr 2e-3 ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from selfmtp.tasks.pretrain_teacher import TeacherConfig, pretrain_tiny_teacher

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src" / "selfmtp" / "assets" / "tiny-gsm-teacher"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="checkpoint directory to write")
    for spec in fields(TeacherConfig):
        if spec.name != "output_dir":
            parser.add_argument(f"--{spec.name.replace('_', '-')}", type=type(spec.default), default=spec.default)
    args = parser.parse_args(argv)
    values = {spec.name: getattr(args, spec.name) for spec in fields(TeacherConfig) if spec.name != "output_dir"}
    config = TeacherConfig(**values, output_dir=args.output)
    metrics = pretrain_tiny_teacher(config)
    recipe_path = Path(args.output) / "recipe.json"
    recipe = json.loads(recipe_path.read_text())
    recipe["command"] = "PYTHONPATH=src python benchmarks/make_tiny_gsm_teacher.py " + shlex.join(argv or sys.argv[1:])
    recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")
    summary = {k: metrics[k] for k in ("test_accuracy", "test_n", "train_seconds", "parameters", "final_loss")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
