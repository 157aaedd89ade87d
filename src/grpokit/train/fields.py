"""How config fields are declared: a default, the `--help` text, and what grpokit accepts.

Every field of `GRPOConfig` (and of the run config's sections) is declared with `option`, or with
`at_default` for a TRL field that grpokit accepts only at TRL's default. Both store the help text
in the field's metadata (`dataclasses.fields(cls)[i].metadata["help"]`, as transformers and TRL
do): the `grpokit` command shows it in `--help` and docs/TRL_COMPAT.md is generated from it.

Metadata keys:

- `help`: the help text.
- `limit`: for a TRL field grpokit supports only partly, which values are refused and why.
- `note`: for a TRL field, how grpokit's support reads next to TRL's (docs/TRL_COMPAT.md).
- `takes_bool`: a string field that also takes True/False as TRL's shorthand for two of its
  values (`scale_rewards`); its annotation stays `str`, as TRL declares it, so that
  `HfArgumentParser` parses a string.
- `accepted` and `reason`: for an `at_default` field, the values accepted (TRL's default, and
  perhaps equivalents) and why any other value is refused.

The metadata is a `FieldMetadata`, so that transformers' `HfArgumentParser` (and TRL's
`TrlParser`, which TRL's scripts build their configs with) can parse `GRPOConfig` as it parses
TRL's: the parser hands a copy of each field's metadata to `argparse` as keyword arguments, and
the copy holds only the help text.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

# How similar (difflib's ratio: twice the matching characters over both lengths) a name must be to
# be suggested for a misspelt one: `temprature` -> `temperature` (0.95), `topp` -> `top_p` (0.89),
# `per_device_batch_size` -> `per_device_train_batch_size` (0.88), but not `use_cache` ->
# `use_cpu` (0.62), a different option.
SUGGESTION_CUTOFF = 0.8


if TYPE_CHECKING:
    KwargsField = dict[str, Any] | None
else:
    KwargsField = dict[str, Any] | str | None
"""The type of a keyword-arguments field (`model_init_kwargs`, ...): a dict, or a JSON string
from the command line, which the config parses at init (`JSON_DICT_FIELDS`). Parsers read the
runtime annotation, where a string makes `HfArgumentParser` pass it through as TRL's fields do;
the type checker sees the value the config holds after init."""


class FieldMetadata(dict[str, Any]):
    """A field's metadata (the keys above) whose `copy()` is what `argparse.add_argument` takes.

    `HfArgumentParser` passes `field.metadata.copy()` to `add_argument` as keyword arguments,
    which refuses grpokit's own keys; its `--help` formats the help text with `%`, so a literal
    `%` is doubled in the copy. Reading the metadata (`field.metadata["note"]`) is unaffected.
    """

    def copy(self) -> dict[str, Any]:
        """The argparse keyword arguments: `help` alone."""
        return {"help": self["help"].replace("%", "%%")}


def option(
    default: Any,
    help: str,
    *,
    limit: str | None = None,
    note: str | None = None,
    takes_bool: bool = False,
) -> Any:
    """A dataclass field with a default and its help text (`metadata["help"]`, shown by `--help`).

    Args:
        default: The default; a mutable one (dict, list) is copied for every instance.
        help: What the field means.
        limit: For a TRL field grpokit supports only partly: the values it refuses and why
            (shown in docs/TRL_COMPAT.md); the config's validation enforces it.
        note: For a fully supported TRL field, what to know next to TRL's meaning (shown in
            docs/TRL_COMPAT.md).
        takes_bool: A string field that also takes True/False (a TRL shorthand); run configs
            accept a YAML bool for it.
    """
    metadata = FieldMetadata(help=help)
    if limit is not None:
        metadata["limit"] = limit
    if note is not None:
        metadata["note"] = note
    if takes_bool:
        metadata["takes_bool"] = True
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def at_default(default: Any, meaning: str, reason: str, *, also: tuple[Any, ...] = ()) -> Any:
    """A TRL field grpokit accepts only at TRL's default (and the values in `also`).

    Any other value is a `ValueError` naming the field and `reason` (`check_at_default`), so a
    TRL script that leaves the field alone runs, and one that relies on it is told why it cannot.

    Args:
        default: TRL's default.
        meaning: What the field does in TRL, in a few words.
        reason: Why grpokit cannot honour another value (what is missing, or what to use).
        also: Further values with the same effect as the default here.
    """
    accepted = (default, *also)
    shown = " or ".join(repr(value) for value in accepted)
    metadata = FieldMetadata(
        help=f"{meaning} Only {shown} here: {reason}.", accepted=accepted, reason=reason
    )
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_TYPE_HINTS: dict[type, dict[str, Any]] = {}


def accepts_none(cls: type, name: str) -> bool:
    """Whether the field `name` of the dataclass `cls` is declared to take None.

    Read from the class's annotations, not from `Field.type`, which `HfArgumentParser`
    overwrites with the one type it parses.
    """
    if cls not in _TYPE_HINTS:
        _TYPE_HINTS[cls] = typing.get_type_hints(cls)
    hint = _TYPE_HINTS[cls][name]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return hint is type(None) or (is_union and type(None) in typing.get_args(hint))


def same_value(a: Any, b: Any) -> bool:
    """Equal values of compatible types: 8000 and 8000.0 are the same, True and 1 are not."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def check_at_default(config: Any) -> None:
    """Raise a `ValueError` for the first `at_default` field of `config` set to another value.

    Raises:
        ValueError: naming the field, its value, why it is refused and what is accepted.
    """
    for f in dataclasses.fields(config):
        accepted = f.metadata.get("accepted")
        if accepted is None:
            continue
        value = getattr(config, f.name)
        if not any(same_value(value, ok) for ok in accepted):
            shown = " or ".join(repr(ok) for ok in accepted)
            raise ValueError(
                f"{f.name}={value!r} is not supported: {f.metadata['reason']}. Remove it "
                f"(accepted: {shown}; TRL's default is {accepted[0]!r})."
            )


def closest_names(key: str, names: Iterable[str]) -> list[str]:
    """The names `key` is most likely a misspelling of: the most similar one, and any other
    almost as similar (`per_device_batch_size` -> the eval and the train batch size); none when
    no name is genuinely close (difflib's similarity ratio below `SUGGESTION_CUTOFF`)."""
    scored = []
    for name in sorted(set(names)):
        ratio = difflib.SequenceMatcher(None, key, name).ratio()
        if ratio >= SUGGESTION_CUTOFF:
            scored.append((ratio, name))
    scored.sort(key=lambda item: -item[0])
    return [name for ratio, name in scored if ratio >= scored[0][0] - 0.05][:3]


def did_you_mean(key: str, names: Iterable[str], prefix: str = "") -> str:
    """`" Did you mean `a`?"` (or `a` or `b`) for a misspelt `key`, or "" (see `closest_names`)."""
    close = [f"`{prefix}{name}`" for name in closest_names(key, names)]
    return f" Did you mean {' or '.join(close)}?" if close else ""
