"""The mixer registry: every token mixer is a `Mixer` subclass registered under a name with its metadata.

    @register("gla", kind="linear", paper="Gated Linear Attention Transformers with Hardware-Efficient Training",
              examples={"default": dict(num_heads=4)})
    class GLA(Mixer): ...

`seqlab.mixers` imports every module of its package (and subpackages), so the built-in families register on
import; a mixer defined elsewhere registers when its module is imported. `create(name, d_model=..., num_heads=...)`
builds one by name; `info(name)` gives its `MixerInfo`.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

from seqlab.mixers.base import Mixer

# softmax attention; one linear state; window + state; convolution; a per-token map (no token mixing)
KINDS = ("softmax", "linear", "hybrid", "conv", "pointwise")


class UnknownArgumentError(TypeError, ValueError):
    """A keyword argument the mixer's constructor does not take (both a TypeError and a ValueError)."""


@dataclasses.dataclass(frozen=True)
class MixerInfo:
    """What the registry knows of mixer `name`.

    cls: the `Mixer` subclass. kind: one of `KINDS` (None: not given). paper: the title of the paper the family
    comes from ("" if not given).
    examples: named small constructor-argument sets (num_heads included; d_model is the caller's, 32 in the shared
    tests), each a read-only mapping; the shared tests build every one. causal: the class's causality (`cls.causal`);
    a mixer whose causality is a constructor argument (``causal=False``) reports it through `causal_with`.
    """

    name: str
    cls: type[Mixer]
    kind: str | None
    paper: str
    examples: Mapping[str, Mapping[str, Any]]
    causal: bool

    def causal_with(self, kwargs: Mapping[str, Any]) -> bool:
        """Whether the mixer built with constructor arguments `kwargs` is causal."""
        return self.causal and kwargs.get("causal", True) is not False


_REGISTRY: dict[str, MixerInfo] = {}


def register(
    name: str, *, kind: str | None = None, paper: str = "", examples: Mapping[str, Mapping[str, Any]] | None = None
) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator: register a `Mixer` subclass under `name` (examples default to ``{"default": {}}``).

    kind (one of `KINDS`) and paper (the title it implements) are listing metadata: optional for a project's own
    mixer (``@register("mine")``), given by every built-in one.

    A second registration of `name` with another class raises ValueError; the same class (or, on a module reload,
    the class of the same module and qualified name) replaces the entry."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be None or one of {list(KINDS)}, got {kind!r}")
    if not isinstance(paper, str):
        raise ValueError(f"paper must be the paper's title (a string), got {paper!r}")
    examples = {"default": {}} if examples is None else examples
    if not examples:
        raise ValueError(f"examples of mixer {name!r} must name at least one argument set")
    frozen = types.MappingProxyType({key: types.MappingProxyType(dict(args)) for key, args in examples.items()})

    def decorate(cls: type[Mixer]) -> type[Mixer]:
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"{name}: only a seqlab.mixers.Mixer subclass can be registered, got {cls!r}")
        previous = _REGISTRY.get(name)
        if previous is not None and _identity(previous.cls) != _identity(cls):
            raise ValueError(
                f"name: mixer {name!r} is already registered as {_identity(previous.cls)}, not {_identity(cls)}"
            )
        accepted = {"num_heads", *keyword_arguments(cls)}
        unknown = sorted({key for args in frozen.values() for key in args} - accepted)
        if unknown:
            raise ValueError(f"examples: {', '.join(unknown)} not an argument of mixer {name!r}")
        _REGISTRY[name] = MixerInfo(name, cls, kind, paper, frozen, cls.causal)
        return cls

    return decorate


def _identity(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def available() -> list[str]:
    """Registered mixer names, sorted."""
    return sorted(_REGISTRY)


def info(name: str) -> MixerInfo:
    """The registry entry of mixer `name` (ValueError listing the known names if there is none)."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown mixer {name!r}; known mixers: {', '.join(available())}")
    return _REGISTRY[name]


def get(name: str) -> type[Mixer]:
    """The mixer class registered under `name`."""
    return info(name).cls


def create(name: str, *, d_model: int, num_heads: int, **kwargs) -> Mixer:
    """Build the mixer `name`; kwargs are its constructor's keyword arguments (rngs, impl, chunk_size, ...).

    rngs defaults to ``nnx.Rngs(0)`` (see `Mixer`): two mixers built without rngs have the same weights."""
    cls = get(name)
    accepted = keyword_arguments(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UnknownArgumentError(
            f"{', '.join(unknown)}: not an argument of mixer {name!r}; it accepts {', '.join(sorted(accepted))}"
        )
    return cls(d_model, num_heads, **kwargs)


def takes_depth(name: str) -> bool:
    """Whether mixer `name` takes its layer's depth (``layer_index``, ``num_layers``) from the model."""
    return "layer_index" in keyword_arguments(get(name))


def keyword_arguments(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword-only arguments of ``cls.__init__``, following ``**kwargs`` up the MRO to the base classes'
    constructors: name -> `inspect.Parameter` (with its default), in declaration order, the subclass's first; an
    argument a subclass redeclares keeps the subclass's parameter."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind is p.KEYWORD_ONLY:
                found.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return found
