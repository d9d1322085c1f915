"""Training options shared by the command-line launchers (``split-unet simulate``, ``centralized``, ``poc``, ...).

One option per ``TrainConfig`` field, made from the field: its name (``--steps-per-epoch``), its type, its choices
(the field's ``metadata["choices"]``) and its docstring as the help. Every option defaults to None: only the options a
user gives override the job config (or ``TrainConfig``).

The fields are read from ``training/config.py``'s source, not imported: importing ``TrainConfig`` imports torch and
MONAI (11 s on a busy 2-core machine, against 0.3 s for the whole command line without them), and every command,
``--help`` included, builds all the options.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TRAIN_CONFIG_SOURCE = Path(__file__).resolve().parents[1] / "training" / "config.py"
# Fields that are no option: the network has its own options below; the privacy terms are the job scope's
# (``defence.py``; a study sets them in its sweep file); activation compression is measured by
# ``split-unet bench --activation-compression``.
NOT_OPTIONS = ("network", "nopeek_weight", "nopeek_levels", "adversarial_weight", "privacy_warmup_steps",
               "activation_compression")
GRID_FIELDS = ("size", "spacing")  # also the grid of commands that read data without training (check, infer)


@dataclass(frozen=True)
class FieldOption:
    """What the command line needs of one ``TrainConfig`` field."""

    name: str
    kinds: tuple[str, ...]  # the annotation's types, e.g. ("int", "None") or ("int", "tuple")
    choices: tuple | None
    help: str


@cache
def train_fields() -> dict[str, FieldOption]:
    """``TrainConfig``'s fields in their order, from the class's source (its annotations, ``metadata["choices"]``
    naming a module constant, and the docstring after each field, as Sphinx reads it)."""
    module = ast.parse(TRAIN_CONFIG_SOURCE.read_text())
    constants = {node.targets[0].id: node.value for node in module.body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    body = next(node for node in module.body if isinstance(node, ast.ClassDef) and node.name == "TrainConfig").body
    options = {}
    for node, following in zip(body, body[1:] + [None]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        choices = None
        if isinstance(node.value, ast.Call):
            metadata = next((k.value for k in node.value.keywords if k.arg == "metadata"), None)
            entries = dict(zip((ast.literal_eval(key) for key in metadata.keys), metadata.values)) if metadata else {}
            if "choices" in entries:
                choices = tuple(ast.literal_eval(constants.get(getattr(entries["choices"], "id", None),
                                                               entries["choices"])))
        has_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and \
            isinstance(following.value.value, str)
        options[node.target.id] = FieldOption(node.target.id, _kinds(node.annotation), choices,
                                              " ".join(following.value.value.split()) if has_doc else "")
    return options


def _kinds(annotation: ast.expr) -> tuple[str, ...]:
    """The types of an annotation: ``int | tuple[int, int, int] | None`` -> ("int", "tuple", "None")."""
    if isinstance(annotation, ast.BinOp):
        return _kinds(annotation.left) + _kinds(annotation.right)
    if isinstance(annotation, ast.Subscript):
        return _kinds(annotation.value)
    return (annotation.id if isinstance(annotation, ast.Name) else str(ast.literal_eval(annotation)),)


def train_overrides(args: argparse.Namespace) -> dict:
    """Only the options the user gave; the job config (or TrainConfig) supplies the rest."""
    train = {name: getattr(args, name) for name in train_fields()
             if name not in NOT_OPTIONS and getattr(args, name, None) is not None}
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
    for name in train_fields():
        if name not in NOT_OPTIONS:
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
    field = train_fields()[name]
    flag, help_text = "--" + name.replace("_", "-"), field.help.replace("%", "%%")  # argparse's formatting
    kinds = set(field.kinds) - {"None"}
    if kinds == {"bool"}:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        return
    kind = shape_option if "tuple" in kinds else int if kinds == {"int"} else float if kinds == {"float"} else str
    parser.add_argument(flag, type=kind, choices=field.choices, default=default, help=help_text)


def shape_option(text: str) -> int | list[int]:
    """``N`` (a cube side) or ``X,Y,Z`` (three sides), as ``TrainConfig`` takes them."""
    sides = [int(side) for side in text.split(",")]
    if len(sides) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected N or X,Y,Z, got {text!r}")
    return sides[0] if len(sides) == 1 else sides
