"""``ldmseg <command> ...``: one entry point for every stage.

Commands are registered by module path and imported only when run, so ``ldmseg --help`` is fast
and commands of the method layer never import Ray. Each command module defines
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("ldmseg.commands.synth", "write seeded synthetic scenes as a COCO panoptic folder"),
    "validate": ("ldmseg.commands.validate", "check a COCO panoptic dataset and report per-image problems"),
    "pq": ("ldmseg.commands.pq", "panoptic quality of a prediction folder against ground truth"),
    "model-summary": ("ldmseg.commands.model_summary", "parameter counts per model component"),
    "preprocess": ("pipelines.preprocess", "Ray Data: COCO panoptic (local or s3://) -> Parquet shards"),
    "train": ("pipelines.train", "Ray Train: train the mask autoencoder (ae) or the diffusion model (ldm)"),
    "evaluate": ("pipelines.evaluate", "segment a dataset with a trained model and report PQ"),
    "tune": ("pipelines.tune", "Ray Tune: search samplers/steps/thresholds or training schedules"),
    "quickstart": ("pipelines.quickstart", "the whole pipeline on synthetic scenes with a local Ray"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return argparse.ArgumentParser(
        prog="ldmseg",
        description="LDMSeg: latent diffusion panoptic segmentation on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun 'ldmseg COMMAND --help' for a command's options.",
        usage="ldmseg [-h] [--version] COMMAND ...",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        from ldmseg import __version__

        print(f"ldmseg {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        top.print_usage(sys.stderr)
        print(f"ldmseg: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"ldmseg {name}: not available in this install ({exc})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"ldmseg {name}", description=(module.__doc__ or help_).strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    try:  # options may come between positionals (``train ae --data X key=value``)
        args = parser.parse_intermixed_args(argv[1:])
    except TypeError:  # commands with sub-commands (``tune sampling``) cannot intermix
        args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
