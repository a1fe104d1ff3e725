"""`gptpkg` command line: one subcommand per pipeline stage, plus tools."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .pipeline import STAGES


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="merge profiles/NAME.yaml over the params file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key of the params file (repeatable); the value is YAML",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptpkg", description="GPT from scratch as an MLOps pipeline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, stage in STAGES.items():
        aliases = [name.replace("_", "-")] if "_" in name else []
        p = sub.add_parser(name, aliases=aliases, help=stage.help, description=stage.help)
        _add_params_args(p)
        p.set_defaults(stage=name)
        p.add_argument(
            "--no-progress",
            action="store_true",
            help="no progress bars (by default they show on a terminal, and log lines elsewhere)",
        )
        if stage.checkpoint:
            p.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint")

    g = sub.add_parser(
        "generate", help="generate text from a checkpoint", description="generate text from a checkpoint"
    )
    g.add_argument("checkpoint", help="checkpoint folder (model.safetensors + config.json)")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=123)
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already generated; 1 = off"
    )
    g.add_argument(
        "--no-repeat-ngram", type=int, default=0, metavar="N", help="forbid repeating a generated N-gram; 0 = off"
    )
    g.set_defaults(stage=None)

    pr = sub.add_parser(
        "profile",
        help="write profiles/NAME.yaml into the params file (for dvc repro)",
        description="write the keys of profiles/NAME.yaml into the params file in place "
        "(comments kept), so `dvc repro` / `dvc exp run` run that profile",
    )
    pr.add_argument("name", nargs="?", default=None, help="profile name (profiles/NAME.yaml next to the params file)")
    pr.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    pr.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="also write this key (repeatable; after the profile); the value is YAML",
    )
    pr.set_defaults(stage=None)

    d = sub.add_parser(
        "dvc-yaml",
        help="write dvc.yaml from the stage registry (--check: only compare)",
        description="write dvc.yaml from the stage registry and the params sections; "
        "--check exits 1 when the file differs from what they generate",
    )
    d.add_argument("--output", default="dvc.yaml", help="the file to write (default: dvc.yaml)")
    d.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    d.set_defaults(stage=None)

    pm = sub.add_parser(
        "promote",
        help="make one packaged model version the one the service serves",
        description="copy a packaged BentoML model version to <name>-served (the service's default "
        "model), alias it 'served' in W&B and tag its commit spam-classifier-onnx#served#N",
    )
    pm.add_argument("tag", nargs="?", default=None, help="BentoML model tag (default: the one package recorded)")
    pm.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    pm.set_defaults(stage=None)

    i = sub.add_parser(
        "presets",
        help="list the model presets with their parameter counts",
        description="list the model presets with their parameter counts",
    )
    i.set_defaults(stage=None)
    return parser


def _generate(args) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .generate import generate_text
    from .tokenizer import get_tokenizer

    model, _ = load_checkpoint(args.checkpoint)
    if model.n_classes:
        print(f"error: {args.checkpoint} is a classifier, not a language model", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    print(
        generate_text(
            model,
            get_tokenizer(),
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            generator=g,
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram=args.no_repeat_ngram,
        )
    )
    return 0


def _presets() -> int:
    import torch

    from .config import PRESETS, model_config
    from .model import GPT

    for name in PRESETS:
        with torch.device("meta"):
            n = GPT(model_config(name)).num_params()
        print(f"{name:12s} {n:>15,d} parameters")
    return 0


def _profile(args) -> int:
    from .config import ConfigError, apply_profile

    try:
        if not args.name and not args.overrides:
            raise ConfigError("give a profile name and/or --set SECTION.KEY=VALUE")
        changed = apply_profile(args.params, args.name, args.overrides)
    except ConfigError as e:
        print(f"gptpkg profile: error: {e}", file=sys.stderr)
        return 1
    what = " and ".join(
        x
        for x in (
            f"profile {args.name!r}" if args.name else "",
            f"{len(args.overrides)} override(s)" if args.overrides else "",
        )
        if x
    )
    print(f"{args.params}: {what} applied, {len(changed)} key(s) changed: {', '.join(changed) or '-'}")
    return 0


def _dvc_yaml(args) -> int:
    from .dvc_yaml import write

    same = write(args.output, check=args.check)
    if args.check and not same:
        print(f"{args.output} differs from the stage registry: run `gptpkg dvc-yaml`", file=sys.stderr)
        return 1
    print(f"{args.output}: {'up to date' if same else 'written'}")
    return 0


def _promote(args) -> int:
    from .config import load_params
    from .promote import promote

    for line in promote(load_params(args.params), args.tag):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Every error a user can cause ends as one line naming it; GPTPKG_DEBUG=1 shows the traceback."""
    args = build_parser().parse_args(argv)
    from .errors import GptpkgError

    try:
        return _main(args)
    except (GptpkgError, OSError) as e:
        if os.environ.get("GPTPKG_DEBUG", "") not in ("", "0"):
            raise
        print(f"gptpkg {args.stage or args.command}: error: {e}", file=sys.stderr)
        return 1


def _main(args) -> int:
    if args.command == "dvc-yaml":
        return _dvc_yaml(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "presets":
        return _presets()
    if args.command == "profile":
        return _profile(args)
    if args.command == "promote":
        return _promote(args)

    from .config import load_params
    from .runner import run_stage

    params = load_params(args.params, args.overrides, args.profile)
    metrics = run_stage(
        args.stage, params, resume=getattr(args, "resume", False), progress=not getattr(args, "no_progress", False)
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary (rank 0's), not one per rank
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
