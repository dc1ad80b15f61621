"""The ``ldm`` command: one verb per pipeline stage, all driven by one config.

Every verb takes ``--config FILE``, ``--preset NAME`` and repeated ``--set key=value``.
Exit code 0 on success; otherwise one line on stderr saying why (the traceback only with
``--debug``). Heavy modules are imported inside each verb so that ``ldm --help`` is quick.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ldm_core.config import PRESETS, Config, load_config
from ldm_core.samplers import ALL_SAMPLERS

log = logging.getLogger("ldm")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, preset=args.preset, overrides=args.set or [])


# --------------------------------------------------------------------------- verbs


def cmd_download(args: argparse.Namespace) -> None:
    from ldm_core.data.download import download

    cfg = _config(args)
    out = download(args.source, args.output, cfg, subjects=args.subjects, seed=args.seed)
    print(out)


def cmd_preprocess(args: argparse.Namespace) -> None:
    from ldm_core.data.preprocess import preprocess

    cfg = _config(args)
    out = preprocess(args.input, args.output, cfg, skip_bad=args.skip_bad)
    print(out)


def cmd_train_autoencoder(args: argparse.Namespace) -> None:
    from ldm_core.train.autoencoder import train_autoencoder

    cfg = _config(args)
    out = train_autoencoder(cfg, args.data, args.output)
    if out is not None:
        print(out)


def cmd_train_diffusion(args: argparse.Namespace) -> None:
    from ldm_core.train.diffusion import train_diffusion

    cfg = _config(args)
    out = train_diffusion(cfg, args.data, args.autoencoder, args.output)
    if out is not None:
        print(out)


def cmd_bundle(args: argparse.Namespace) -> None:
    from ldm_core.bundle import build_bundle

    print(build_bundle(args.autoencoder, args.diffusion, args.output, args.data))


def cmd_sample(args: argparse.Namespace) -> None:
    from ldm_core.bundle import config_for
    from ldm_core.sample import sample_to_dir

    # The bundle's own config: its objective decides the default sampler.
    cfg = config_for(args.bundle, args.config, args.preset, args.set or [])
    paths = sample_to_dir(
        args.bundle,
        args.output,
        num=args.num if args.num is not None else cfg.sampling.num_samples,
        seed=args.seed,
        sampler=args.sampler or cfg.sampling.sampler,
        steps=args.steps or cfg.sampling.steps,
        compile=args.compile,
        precision=cfg.sampling.precision,
    )
    for p in paths:
        print(p)


def cmd_evaluate(args: argparse.Namespace) -> None:
    import json

    from ldm_core.evaluate import evaluate

    cfg = _config(args)
    result = evaluate(cfg, args.bundle, args.data, args.output)
    print(json.dumps(result, indent=2, default=str))


def cmd_lineage(args: argparse.Namespace) -> None:
    import json

    from ldm_core import lineage

    if (args.path is None) == (args.isvc is None):
        raise lineage.LineageError("give a PATH or --isvc NAME (one of them)")
    if args.isvc is not None:
        from ldm_core.kube import isvc_lineage

        record = isvc_lineage.read(args.isvc, args.namespace)
    elif (args.path / "bundle.json").is_file():
        from ldm_core.bundle import lineage as bundle_lineage

        record = bundle_lineage(args.path)
    else:
        record = lineage.read(args.path)
    if args.json:
        print(json.dumps(record, indent=2))
        return
    rows = lineage.rows(record)
    width = max(len(field) for field, _ in rows)
    for field, value in rows:
        print(f"{field.ljust(width)}  {value}")


def cmd_serve(args: argparse.Namespace) -> None:
    from ldm_core.bundle import config_for

    cfg = config_for(args.bundle, args.config, args.preset, args.set or [])
    # Importing kserve runs its own parser over sys.argv (kserve/__init__ imports
    # kserve.model_server, which parses at module level), and argparse's prefix matching
    # reads our --config as its --configure_logging. This command line is parsed already
    # and the server passes KServe every setting itself, so KServe is left none to read.
    del sys.argv[1:]
    from ldm_core.serve.server import serve

    serve(
        cfg,
        args.bundle,
        http_port=args.http_port,
        model_name=args.model_name,
        host=args.host,
        device=args.device,
    )


# --------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser) -> None:
    """The arguments every verb takes: one config, resolved the same way everywhere."""
    p.add_argument("--config", type=Path, help="YAML config file (a full or partial Config)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="base settings the config file and --set refine (default: the file's "
        "'preset:' key, else tiny-cpu)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.autoencoder.steps=10 (repeatable)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _download_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        required=True,
        help="demo | msd | http(s)://URL of a .tar/.tar.gz | s3://bucket/prefix | a local DIR",
    )
    p.add_argument("--output", required=True, type=Path, help="directory to fill")
    p.add_argument(
        "--subjects",
        type=int,
        help="demo: number of subjects to generate (default: data.demo_subjects)",
    )
    p.add_argument("--seed", type=int, default=0, help="demo: random seed (default 0)")


def _preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", required=True, type=Path, help="raw dataset (Task01 layout or a folder of NIfTI)"
    )
    p.add_argument("--output", required=True, type=Path, help="cache directory to write")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable files (listed in the manifest) instead of failing",
    )


def _train_autoencoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="preprocessed cache directory")
    p.add_argument("--output", required=True, help="run directory for checkpoints and logs")


def _train_diffusion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="preprocessed cache directory")
    p.add_argument("--autoencoder", required=True, help="finished autoencoder run directory")
    p.add_argument("--output", required=True, help="run directory for checkpoints and logs")


def _bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoder", required=True, help="autoencoder run directory")
    p.add_argument("--diffusion", required=True, help="diffusion run directory")
    p.add_argument("--output", required=True, help="bundle directory to write")
    p.add_argument(
        "--data",
        help="the preprocessed cache the models were trained on: stores its output reference "
        "(mean intensity, foreground fraction, detail) in bundle.json for drift monitoring",
    )


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="model bundle directory")
    p.add_argument("--output", required=True, type=Path, help="directory for NIfTI and PNG files")
    p.add_argument("--num", type=int, help="number of samples (default: sampling.num_samples)")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i")
    p.add_argument(
        "--sampler",
        choices=ALL_SAMPLERS,
        help="default: sampling.sampler; the bundle's model.scheduler.objective limits the choice",
    )
    p.add_argument("--steps", type=int, help="denoising steps (default: sampling.steps)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the UNet for this batch first (pays off on a GPU)",
    )


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="model bundle directory")
    p.add_argument("--data", required=True, help="preprocessed cache directory (real images)")
    p.add_argument(
        "--output", required=True, type=Path, help="directory for metrics.json and figures"
    )


def _lineage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        nargs="?",
        type=Path,
        help="a bundle, an evaluation's output, a deploy's output (deployment.json), or a "
        "lineage.json",
    )
    p.add_argument(
        "--isvc", metavar="NAME", help="read it from this InferenceService (Kubernetes API)"
    )
    p.add_argument("--namespace", help="the InferenceService's (default: the context's)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bundle",
        required=True,
        help="model bundle directory; its config.yaml is the config unless --config is given",
    )
    p.add_argument("--http-port", type=int, default=None, help="default: serving.http_port (8080)")
    p.add_argument("--model-name", default=None, help="default: serving.model_name (brain-ldm)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")


@dataclass(frozen=True)
class Verb:
    """One ``ldm`` verb: what it runs, its help line, and its own arguments (the common
    ``--config/--preset/--set/--debug`` are added to every verb by :func:`_common`)."""

    name: str
    run: Callable[[argparse.Namespace], None]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]


VERBS: tuple[Verb, ...] = (
    Verb(
        "download",
        cmd_download,
        "fetch or generate a raw dataset in the Decathlon Task01 layout",
        _download_args,
    ),
    Verb(
        "preprocess",
        cmd_preprocess,
        "resample, crop/pad and scale volumes into a training cache",
        _preprocess_args,
    ),
    Verb(
        "train-autoencoder",
        cmd_train_autoencoder,
        "train the AutoencoderKL (resumes from OUTPUT if it holds checkpoints)",
        _train_autoencoder_args,
    ),
    Verb(
        "train-diffusion",
        cmd_train_diffusion,
        "train the latent diffusion UNet on cached latents (resumes)",
        _train_diffusion_args,
    ),
    Verb(
        "bundle",
        cmd_bundle,
        "pack a trained autoencoder and UNet into a servable model bundle",
        _bundle_args,
    ),
    Verb(
        "sample", cmd_sample, "generate synthetic volumes (NIfTI + PNG) from a bundle", _sample_args
    ),
    Verb(
        "evaluate",
        cmd_evaluate,
        "score generated samples against real data; write metrics and figures",
        _evaluate_args,
    ),
    Verb(
        "lineage",
        cmd_lineage,
        "show what a bundle was made from, how it scored and where it is served",
        _lineage_args,
    ),
    Verb(
        "serve",
        cmd_serve,
        "serve a bundle with KServe (V1 and Open Inference Protocol V2)",
        _serve_args,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Train and serve 3D latent diffusion models of brain MRI.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        p.set_defaults(func=verb.run)
        _common(p)
        verb.arguments(p)
    return parser


def setup_logging(debug: bool = False) -> None:
    rank = os.environ.get("RANK")
    prefix = (
        f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    )
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; the traceback behind --debug
        if args.debug:
            raise
        from ldm_core.errors import LdmError

        reason = str(e) if isinstance(e, LdmError) else f"{type(e).__name__}: {e}"
        print(f"ldm {args.verb}: error: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
