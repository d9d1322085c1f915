"""Training options shared by the command-line launchers (``split-unet simulate``, ``centralized``, ``poc``, ...).

One option per ``TrainConfig`` field, made from the field: its name (``--steps-per-epoch``), its type, its choices
(the field's ``metadata["choices"]``) and its docstring as the help. Every option defaults to None: only the options a
user gives override the job config (or ``TrainConfig``).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
import typing
from dataclasses import fields
from functools import cache

from split_unet.training.config import TrainConfig

# Fields that are no option: the network has its own options below; the privacy terms are the job scope's
# (``defence.py``; a study sets them in its sweep file); activation compression is measured by
# ``split-unet bench --activation-compression``.
NOT_OPTIONS = ("network", "nopeek_weight", "nopeek_levels", "adversarial_weight", "privacy_warmup_steps",
               "activation_compression")
GRID_FIELDS = ("size", "spacing")  # also the grid of commands that read data without training (check, infer)


def train_overrides(args: argparse.Namespace) -> dict:
    """Only the options the user gave; the job config (or TrainConfig) supplies the rest."""
    train = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name not in NOT_OPTIONS and getattr(args, f.name, None) is not None}
    network = {}
    if getattr(args, "channels", None):
        network["channels"] = [int(c) for c in args.channels.split(",")]
        network["strides"] = [2] * (len(network["channels"]) - 1)
    if getattr(args, "levels", None):
        network["levels"] = [int(level) for level in args.levels.split(",")]
    if getattr(args, "fusion", None):
        network["fusion"] = args.fusion
    for key in ("full_res_channels", "full_res_bits"):
        if getattr(args, key, None) is not None:
            network[key] = getattr(args, key)
    if network:
        train["network"] = network
    return train


def add_train_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults: the job config / TrainConfig)")
    for name in (f.name for f in fields(TrainConfig) if f.name not in NOT_OPTIONS):
        add_field_option(group, name)
    network = parser.add_argument_group("network (defaults: the job config / NetworkConfig)")
    network.add_argument("--channels", help="feature channels per level, e.g. 8,16,32,64")
    network.add_argument("--levels", help="levels the sites send, e.g. 1,2,3 (default: all)")
    network.add_argument("--fusion", choices=("concat", "mean"))
    network.add_argument("--full-res-channels", type=int,
                         help="send the full-resolution level narrowed to this many learned channels (default: all)")
    network.add_argument("--full-res-bits", type=int,
                         help="quantise the narrowed full-resolution level to 2**bits values per channel")


def add_grid_options(parser, size_default: int | None = None) -> None:
    """``--size`` and ``--spacing``: the common voxel grid (README, "Your own data", on how to choose them)."""
    for name in GRID_FIELDS:
        add_field_option(parser, name, default=size_default if name == "size" else None)


def add_field_option(parser, name: str, default: object = None) -> None:
    """The option of ``TrainConfig``'s field ``name``: ``--name-with-dashes``, typed as the field, its docstring as
    help. A bool field is a switch with its negation (``--amp`` / ``--no-amp``)."""
    field = next(f for f in fields(TrainConfig) if f.name == name)
    kinds = [kind for kind in typing.get_args(_type_hints()[name]) or (_type_hints()[name],) if kind is not type(None)]
    flag, help_text = "--" + name.replace("_", "-"), field_help()[name].replace("%", "%%")  # argparse's formatting
    if kinds == [bool]:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        return
    if any(typing.get_origin(kind) is tuple for kind in kinds):
        kind = shape_option
    else:
        kind = int if kinds == [int] else float if kinds == [float] else str
    parser.add_argument(flag, type=kind, choices=field.metadata.get("choices"), default=default, help=help_text)


@cache
def _type_hints() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


@cache
def field_help() -> dict[str, str]:
    """Each ``TrainConfig`` field's docstring (the string after the field, as Sphinx reads it), on one line. Python
    keeps no such docstring at run time, so it is read from the class's source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig))).body[0].body
    return {node.target.id: " ".join(following.value.value.split())
            for node, following in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)}


def shape_option(text: str) -> int | list[int]:
    """``N`` (a cube side) or ``X,Y,Z`` (three sides), as ``TrainConfig`` takes them."""
    sides = [int(side) for side in text.split(",")]
    if len(sides) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected N or X,Y,Z, got {text!r}")
    return sides[0] if len(sides) == 1 else sides
