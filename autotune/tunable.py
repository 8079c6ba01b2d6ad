"""What a kernel hands the autotuner: a :class:`Tunable`, and the registry that holds them.

A tunable names its kernel (which is also the config file's name), its search space, the
pruning rule run before anything compiles, the shape bucket its runtime lookup computes, and
how to build inputs, launch one config, compute the reference and judge the error. Shapes
are plain dicts (``{"B": 1, "T": 4096, "H": 64, "D": 128, "E": 128, "dtype": "bf16"}`` for
lightning attention) so they travel to worker processes and into JSON unchanged.

Every callable must be a module-level function: the runner pickles the tunable into a
worker process, and pickle stores functions by their import path.

Built-in tunables live in the modules of :data:`BUILTIN_MODULES` and are imported on the
first :func:`get` or :func:`names`, not when ``autotune`` is imported: importing a kernel
module decides whether it runs compiled or through the Triton interpreter, and
``kwb tune --interpret`` must set that first.
"""
from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Collection

Shape = dict[str, Any]
Config = dict[str, Any]

BUILTIN_MODULES = ("autotune.lightning", "autotune.lightning_decode", "autotune.moe")


@dataclass(frozen=True)
class Tunable:
    """A kernel's search space plus everything needed to check and time one config."""

    name: str  # kernel name: the config file is <root>/<gpu-slug>/<name>.json
    # parameter -> the values it may take; or a list of such dicts, a union of products for
    # kernels whose variants take different parameters (e.g. one per backend)
    space: dict[str, list] | list[dict[str, list]]
    is_valid: Callable[[Config, Shape], bool]  # pruning before compiling
    bucket: Callable[[Shape], dict]  # the key written to the file == the runtime lookup's key
    make_inputs: Callable[[Shape, str], Any]  # (shape, device) -> inputs, fresh random values
    run: Callable[[Any, Config], Any]  # launch with an explicit config -> output tensor(s)
    reference: Callable[[Any], Any]  # inputs -> expected output tensor(s)
    tolerance: Callable[[Shape], float]  # bound on the relative Frobenius error
    bytes_moved: Callable[[Shape], int]  # each input read once, each output written once
    default_config: Callable[[Shape], Config]  # what the runtime launches when nothing is tuned
    shape_sets: dict[str, list[Shape]]  # named shape sets, e.g. "minimax", "small"
    parse_shape: Callable[[str], Shape]  # "T=4096,H=64,D=128" -> a full shape
    near: tuple[str, ...] = ()  # key fields the runtime lookup may round to the nearest entry
    # restores inputs that ``run`` updates in place (a decode step's state) before each
    # reference check, so every candidate is checked on the inputs the reference saw
    reset: Callable[[Any], None] | None = None

    def configs(self) -> list[Config]:
        """Every point of the space (the cartesian product, or the union of the products),
        valid or not."""
        out = []
        for space in self.space if isinstance(self.space, list) else [self.space]:
            params = list(space)
            out += [dict(zip(params, values)) for values in itertools.product(*(space[p] for p in params))]
        return out

    def candidates(self, shape: Shape) -> list[Config]:
        """The points of the space that :attr:`is_valid` keeps for ``shape``."""
        return [config for config in self.configs() if self.is_valid(config, shape)]

    def shapes(self, spec: str) -> list[Shape]:
        """A named shape set, or custom shapes separated by ``;`` (see :attr:`parse_shape`)."""
        if spec in self.shape_sets:
            return [dict(shape) for shape in self.shape_sets[spec]]
        return [self.parse_shape(part) for part in spec.split(";") if part.strip()]


def shape_label(shape: Shape) -> str:
    """``{"T": 4096, "H": 64}`` -> ``"T=4096,H=64"`` (the syntax :attr:`Tunable.parse_shape` reads)."""
    return ",".join(f"{name}={value}" for name, value in shape.items())


def parse_assignments(text: str) -> dict[str, Any]:
    """``"T=4096, H=64,dtype=bf16"`` -> ``{"T": 4096, "H": 64, "dtype": "bf16"}`` (ints where they parse)."""
    out: dict[str, Any] = {}
    for part in text.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name or not value:
            raise ValueError(f"expected NAME=VALUE pairs separated by commas, got {part.strip()!r} in {text!r}")
        out[name] = int(value) if value.lstrip("-").isdigit() else value
    return out


def parse_shape_text(
    text: str, *, what: str, fields: tuple[str, ...], required: tuple[str, ...], defaults: dict[str, Any],
    choices: dict[str, Collection[str]],
) -> Shape:
    """``"T=4096,H=64"`` -> a full shape with ``fields`` in order: the ``required`` fields must
    be given; missing others come from ``defaults`` (a value, or a function of the given
    fields); a field in ``choices`` must be one of its values, every other field a positive
    integer. ValueError names ``what`` shape, the text and the field."""
    given = parse_assignments(text)
    unknown = sorted(set(given) - set(fields))
    missing = [n for n in required if n not in given]
    if unknown or missing:
        raise ValueError(
            f"{what} shape {text!r}: fields are {', '.join(fields)} with {', '.join(required)} required"
            f" (unknown: {unknown or 'none'}, missing: {missing or 'none'})"
        )
    shape = {**{n: d(given) if callable(d) else d for n, d in defaults.items() if n not in given}, **given}
    for name, allowed in choices.items():
        if shape[name] not in allowed:
            raise ValueError(f"{what} shape {text!r}: {name} must be one of {', '.join(allowed)}, got {shape[name]!r}")
    for name in fields:
        if name not in choices and (not isinstance(shape[name], int) or shape[name] < 1):
            raise ValueError(f"{what} shape {text!r}: {name} must be a positive integer, got {shape[name]!r}")
    return {name: shape[name] for name in fields}


_REGISTRY: dict[str, Tunable] = {}


def register(tunable: Tunable) -> Tunable:
    """Add ``tunable`` to the registry; a second tunable with the same name is an error."""
    if tunable.name in _REGISTRY and _REGISTRY[tunable.name] is not tunable:
        raise ValueError(f"a tunable named {tunable.name!r} is already registered")
    _REGISTRY[tunable.name] = tunable
    return tunable


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def get(name: str) -> Tunable:
    """The registered tunable ``name``; KeyError listing the known names otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no tunable kernel named {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    """Names of all registered tunables, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)
