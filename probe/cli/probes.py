"""One generic subcommand per registered probe.

The shared target flags (``--model | --run [--checkpoint EPOCH|last|init|all] --data --data-root
--image-size --n --seed --device --runs``, user-factory flags, ``--html``) are defined here once;
a probe's own flags come from its parameters dataclass: a field ``foo_bar`` becomes
``--foo-bar`` (a bool defaulting to true becomes ``--no-foo-bar``), with its help text, default
and choices.
"""
from __future__ import annotations

import argparse
import dataclasses

from probe.cli.common import (Output, factory_args, flag_name, open_store, parse_model_args, rank_group,
                              runs_arg)
from probe.errors import UserError

__all__ = ["register_probe_commands"]


def _target_args(p: argparse.ArgumentParser, default_n: int) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="a registered model or package.module:factory (probed at its seeded "
                                   "initialisation)")
    g.add_argument("--run", help="a run id, unique prefix or 'last' (probed on the data it was trained on)")
    p.add_argument("--checkpoint", default=None,
                   help="with --run: an epoch, last, init or all (default: last)")
    p.add_argument("--data", default=None, help="data set for a model given by name, or npz:FILE for arrays x, y "
                                                "of one's own (default: digits; a run uses its own)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder with the data set's local files (default: a run's own, else $PROBE_DATA, ./data, "
                        "/usr/share/datasets/<name>)")
    p.add_argument("--image-size", type=int, default=None,
                   help="square input side for a model given by name (default: the data set's own; a run uses "
                        "its own)")
    p.add_argument("--n", type=int, default=default_n, help=f"number of probe inputs (default: {default_n})")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra model argument (with --model)")
    p.add_argument("--weights", metavar="FILE", default=None,
                   help="with --model: probe it with these trained weights instead of its initialisation: a "
                        "state_dict saved by torch.save (read weights-only), a checkpoint dict holding one, or a "
                        ".safetensors file; the stored result records the file's name and sha256 (default: none)")
    p.add_argument("--weights-key", metavar="KEY", default=None,
                   help="with --weights: the checkpoint entry holding the state_dict (default: the file itself "
                        "when it is one, else the first of state_dict, model, model_state_dict)")
    factory_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the probe data (default: 0)")
    p.add_argument("--html", metavar="PATH", default=None,
                   help="also write the probe's figures (every figure of its explorer page) as one standalone page "
                        "(default: none)")
    p.add_argument("--html-js", choices=("inline", "shared"), default="shared",
                   help="plotly.js of the --html page: shared (one plotly.min.js written beside the page, "
                        "loaded by a relative path) or inline (embedded, 4.8 MB per page) (default: shared)")
    p.add_argument("--png", metavar="PATH", default=None,
                   help="also write the figures as PNG images: PATH for the main figure, PATH's stem plus the "
                        "figure's name for the others (needs plotly's kaleido) (default: none)")
    p.add_argument("--svg", metavar="PATH", default=None,
                   help="the same as --png, as SVG (default: none)")
    runs_arg(p)


def _target_kwargs(args) -> dict:
    """The shared target flags, checked, as keyword arguments of :func:`probe.jobs.run_probe`."""
    if args.model is None and args.run is None:
        raise UserError(f"give --model NAME or --run RUN (e.g. `probe {args.command} --model mul_resnet`)")
    if args.model is not None:
        if args.checkpoint not in (None, "init"):
            raise UserError("--checkpoint needs --run (a model given by name is probed at its initialisation)")
        if args.factory is not None or args.trust_factory:
            raise UserError("--factory / --trust-factory apply to --run; give a factory itself as --model "
                            "package.module:factory")
    elif args.model_arg:
        raise UserError("--model-arg applies to --model; a run rebuilds its model from its stored config")
    elif args.weights is not None:
        raise UserError("--weights applies to --model; a run loads its own checkpoints (--checkpoint)")
    if args.weights_key is not None and args.weights is None:
        raise UserError("--weights-key selects an entry of the --weights file; give --weights FILE too")
    return dict(model=args.model, run=args.run, checkpoint=args.checkpoint, data=args.data,
                data_root=args.data_root, image_size=args.image_size, n=args.n, device=args.device,
                seed=args.seed, model_args=parse_model_args(args.model_arg), factory=args.factory,
                trust_factory=args.trust_factory, weights=args.weights, weights_key=args.weights_key)


def _add_param_flags(p: argparse.ArgumentParser, params: type) -> None:
    from probe.probes.registry import param_fields

    for f in param_fields(params):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text, choices = f.metadata["help"], f.metadata.get("choices")
        if isinstance(default, bool):
            if default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f"param_{f.name}", action="store_false",
                               default=True, help=f"turn off: {text}")
            else:
                p.add_argument(flag_name(f.name), dest=f"param_{f.name}", action="store_true", default=False,
                               help=text if "default" in text else f"{text} (default: off)")
            continue
        kind = type(default) if isinstance(default, (int, float, str)) else str
        # choices are checked with the other values (one-line error naming the option), not by argparse
        shown = f"one of {', '.join(map(str, choices))}; " if choices else ""
        # a help text that states its default itself keeps its wording (no second "(default: ...)")
        tail = f" ({shown.removesuffix('; ')})" if shown and "default" in text else "" if "default" in text \
            else f" ({shown}default: {default})"
        p.add_argument(flag_name(f.name), dest=f"param_{f.name}", type=kind, default=default, metavar=f.name.upper(),
                       help=text + tail)


def _param_values(args, params: type) -> dict:
    return {f.name: getattr(args, f"param_{f.name}") for f in dataclasses.fields(params)}


def _where(info: dict) -> str:
    if info.get("weights"):
        return f"weights {info['weights']['file']}, sha256 {info['weights']['sha256'][:12]}"
    if info.get("run_id") is None:
        return "init"
    return "init" if not info.get("epoch") else f"epoch {info['epoch']}"


def _command(spec):
    def run(args) -> Output:
        from probe.jobs import figure_entries, run_probe

        kwargs = _target_kwargs(args)
        if args.png or args.svg:              # before the work: a missing image engine is known now
            from probe.figures import static_engine

            if static_engine():
                raise UserError(static_engine())
        # under torchrun: every rank reads the store, rank 0 alone writes and reports
        with rank_group(args.device, args.quiet) as (main, progress):
            outcomes = run_probe(open_store(args, readonly=not main), spec, _param_values(args, spec.params),
                                 progress=progress, **kwargs)
        if not main:
            return None
        lines = []
        for o in outcomes:
            head = f"{o.info['model']} ({_where(o.info)})"
            if o.error is not None:
                lines.append(f"{head}: failed: {o.error}")
                continue
            lines.append(head)
            lines += ["  " + line for line in o.result.text().splitlines()]
            if o.info.get("probe_id"):
                lines.append(f"  stored as probe {o.info['probe_id']}")
        data = {"results": [o.to_json() for o in outcomes], "count": len(outcomes)}
        entries = figure_entries(outcomes)
        if (args.html or args.png or args.svg) and entries:
            lines += _write_figures(args, spec, entries, data)
        return Output(data, "\n".join(lines))

    return run


def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:48] or "figure"


def _write_figures(args, spec, entries: list, data: dict) -> list[str]:
    """``--html`` (one page with every figure of the probe's explorer page), ``--png`` / ``--svg``
    (one image per figure); the paths go into ``data`` and the returned lines."""
    from pathlib import Path

    from probe.figures import write_html, write_image
    from probe.probes.registry import probe_figures

    figures = probe_figures(spec, entries)
    if not figures:
        return []
    lines = []
    try:
        if args.html:
            js = Path(args.html).absolute().parent / "plotly.min.js" if args.html_js == "shared" else None
            path = write_html(figures, args.html, plotlyjs=js, title=f"probe {spec.name}")
            data["html"] = str(path)
            lines.append(f"figures: {path}" + (f" (plotly.js: {js})" if js else ""))
        for fmt, target in (("png", args.png), ("svg", args.svg)):
            if not target:
                continue
            base = Path(target)
            paths = []
            for i, (title, fig) in enumerate(figures.items()):
                where = base if i == 0 else base.with_name(f"{base.stem}-{_slug(title)}{base.suffix or '.' + fmt}")
                paths.append(str(write_image(fig, where, fmt=fmt)))
            data[fmt] = paths
            lines.append(f"{fmt}: {', '.join(paths)}")
    except OSError as e:
        raise UserError(f"cannot write {e.filename or 'a figure'} ({e.strerror or e})") from None
    return lines


def register_probe_commands(sub, common) -> None:
    """Add one subcommand per registered probe."""
    from probe.probes.registry import get_probe, list_probes

    for name in list_probes():
        spec = get_probe(name)
        p = sub.add_parser(name, parents=[common], help=spec.help, description=spec.description or spec.help)
        _target_args(p, spec.default_n)
        _add_param_flags(p, spec.params)
        p.set_defaults(func=_command(spec))
