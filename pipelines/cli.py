"""``ldmseg <command> ...``: one entry point for every stage.

Commands are registered by module path and imported only when run, so ``ldmseg --help`` is fast
and commands of the method layer never import Ray. Each command module defines
``add_arguments(parser)`` and ``run(args) -> int``. This module sits at the top of the pipeline
layer: it imports the method layer (``ldmseg``) and the pipelines by name; only the commands that
parse other commands' arguments (``submit``, ``check-infra``) import it back, lazily, through
:func:`command_parser`.
Progress records are printed on stderr (:func:`ldmseg.logs.setup_logging`).

One error boundary around ``run``: an error caused by the call's inputs (a bad config key or
override, a missing folder, a damaged model folder, missing S3 credentials; see
:func:`bad_input_message`) becomes one line on stderr naming the input and the fix, exit status 2.
Any other exception is a bug and keeps its traceback. ``--debug`` (before or after the command)
shows the traceback of input errors too.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("ldmseg.commands.synth", "write seeded synthetic scenes as a COCO panoptic folder"),
    "validate": ("ldmseg.commands.validate", "check a COCO panoptic dataset and report per-image problems"),
    "pq": ("ldmseg.commands.pq", "panoptic quality of a prediction folder against ground truth"),
    "model-summary": ("ldmseg.commands.model_summary", "parameters, training memory per GPU, checkpoint size"),
    "preprocess": ("pipelines.preprocess", "Ray Data: COCO panoptic (local or s3://) -> Parquet shards"),
    "train": ("pipelines.train", "Ray Train: train the mask autoencoder (ae) or the diffusion model (ldm)"),
    "evaluate": ("pipelines.evaluate", "segment a dataset with a trained model and report PQ"),
    "segment": ("pipelines.segment", "Ray Data: segment a folder, bucket or list of images (COCO panoptic out)"),
    "serve": ("pipelines.serve", "Ray Serve: a segmentation and inpainting endpoint with a web page"),
    "tune": ("pipelines.tune", "Ray Tune sweeps: sampling options, training schedules, inpainting"),
    "quickstart": ("pipelines.quickstart", "the whole pipeline on synthetic scenes with a local Ray"),
    "submit": ("pipelines.submit", "submit a command as a Ray job to a cluster (uploads the working tree)"),
    "job": ("pipelines.jobs", "status, logs, stop or list of submitted Ray jobs"),
    "check-infra": ("pipelines.infra_check", "validate the infra/ manifests offline (KubeRay, Serve, Kubernetes)"),
}


DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the full traceback of an input error instead of one line"

# errors matched by class name, so that their packages need not be installed (or imported)
CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError")  # botocore
SAFETENSORS_ERRORS = ("SafetensorError", "SafetensorHeaderError")
_PATH_ERRORS = {FileNotFoundError: "no such file or folder", NotADirectoryError: "not a folder",
                IsADirectoryError: "a folder, not a file"}
_OWN_PREFIX = re.compile(r"^ldmseg(?: [\w-]+)*: ")  # "ldmseg tune: ..." of a SystemExit message


def bad_input_message(exc: BaseException) -> str | None:
    """The message of an error caused by a command's inputs, or ``None`` for anything else (a bug)."""
    import yaml

    from ldmseg.config import ConfigError
    from ldmseg.data.coco import DataError
    from ldmseg.inputs import InputError
    from ldmseg.metrics.pq_io import PQInputError

    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, SystemExit):  # raise SystemExit("ldmseg ...: message")
        return exc.code if isinstance(exc.code, str) else None
    if isinstance(exc, DataError):
        return exc.reason
    if isinstance(exc, (ConfigError, InputError, PQInputError)):
        return str(exc)
    if type(exc) in _PATH_ERRORS:
        if exc.filename is None:
            return str(exc)
        return f"{exc.filename}: {_PATH_ERRORS[type(exc)]}; check the path"
    if isinstance(exc, yaml.YAMLError):
        return f"not valid YAML: {exc}"
    if names & set(SAFETENSORS_ERRORS):
        return f"unreadable safetensors weights ({exc}); the model folder is damaged: copy or train the model again"
    if names & set(CREDENTIAL_ERRORS):
        return (f"no AWS credentials found ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE), and AWS_ENDPOINT_URL for an S3-compatible server")
    return None


def _one_line(text: str) -> str:
    return " ".join(_OWN_PREFIX.sub("", text).split())


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return argparse.ArgumentParser(
        prog="ldmseg",
        description="LDMSeg: latent diffusion panoptic segmentation on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(lines) + f"\n\n{DEBUG_FLAG}: {DEBUG_HELP} (before or after COMMAND)."
               "\nRun 'ldmseg COMMAND --help' for a command's options.",
        usage="ldmseg [-h] [--version] [--debug] COMMAND ...",
    )


def command_parser(name: str):
    """``(module, parser)`` of command ``name`` (one of :data:`COMMANDS`), its module imported."""
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"ldmseg {name}", description=(module.__doc__ or help_).strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)  # main() takes it out of argv
    return module, parser


def parse_command_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """A command's arguments; argparse's usage error exits 2."""
    try:  # options may come between positionals (``train ae --data X key=value``)
        return parser.parse_intermixed_args(argv)
    except TypeError:  # commands with sub-commands (``tune sampling``) or a REMAINDER cannot intermix
        return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
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
    from ldmseg.logs import setup_logging

    setup_logging()
    try:
        module, parser = command_parser(name)
    except ModuleNotFoundError as exc:
        print(f"ldmseg {name}: not available in this install ({exc})", file=sys.stderr)
        return 2
    args = parse_command_args(parser, argv[1:])
    try:
        return int(module.run(args) or 0)
    except (Exception, SystemExit) as exc:
        message = None if debug else bad_input_message(exc)
        if message is None:
            raise
        where = " ".join(x for x in ("ldmseg", name, getattr(args, "what", None)) if x)
        print(f"{where}: {_one_line(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
