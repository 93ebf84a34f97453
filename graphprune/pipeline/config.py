"""Declarative pipelines: a TOML file lists passes and their options; validated whole, then run.

Format::

    [pipeline]
    name = "hierarchical"
    description = "..."

    [[pass]]
    name = "analyze"
    eps = 0.01

    [[pass]]
    name = "plan"
    macs = 0.5

Unknown tables, keys, pass names, wrong value types, out-of-range values and
passes in an impossible order (a rewrite without a plan...) are errors before
any work starts.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from graphprune.errors import BadInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from graphprune.pipeline import limit as _limit  # noqa: F401  (registers the limit pass)
from graphprune.pipeline.passes import PASSES
from graphprune.pipeline.workspace import Pass, PassResult, Workspace, check_order
from graphprune.planning.options import TARGETS

__all__ = ["Pipeline", "apply_overrides", "load_pipeline", "parse_pipeline", "preset_names", "preset_path", "run_passes", "with_hidden"]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A validated list of passes with their options."""

    name: str
    description: str
    passes: tuple[Pass, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.passes)


def _type_ok(value: Any, hint: Any) -> bool:
    args = typing.get_args(hint)
    if args:  # Optional[...] / unions
        return any(_type_ok(value, a) for a in args if a is not type(None))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return False


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(_type_name(a) for a in args) if args else getattr(hint, "__name__", str(hint))


def _build_pass(entry: Mapping[str, Any], where: str) -> Pass:
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise BadInputError(f"{where}: each [[pass]] needs a name (one of {', '.join(PASSES)})")
    name = entry["name"]
    if name not in PASSES:
        raise BadInputError(f"{where}: unknown pass '{name}' (known: {', '.join(PASSES)})")
    cls = PASSES[name]
    hints = typing.get_type_hints(cls.Options)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    params = {k: v for k, v in entry.items() if k != "name"}
    for key, value in params.items():
        if key not in fields:
            raise BadInputError(f"{where}: pass '{name}' has no parameter '{key}' (known: {', '.join(sorted(fields))})")
        if not _type_ok(value, hints[key]):
            raise BadInputError(f"{where}: pass '{name}' parameter '{key}' must be {_type_name(hints[key])}, got {value!r}")
    options = cls.Options(**{k: float(v) if hints[k] is float else v for k, v in params.items()})
    check = getattr(options, "check", None)
    if check is not None:
        try:
            check()
        except BadInputError as exc:
            raise BadInputError(f"{where}: pass '{name}': {exc}") from None
    return cls(options)


_INT8_FORM = ("activations", "reduce_range")
"""The quantize pass's options that decide the int8 model's kernels, which a profile pass timing int8 must share."""


def _default(cls: type, key: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == key)


def _timed_as_shipped(entries: list[Any], where: str) -> list[Any]:
    """Profile passes that time int8 take the int8 form of the pipeline's quantize pass unless they set it.

    Raises:
        BadInputError: When a profile pass sets a form other than the quantize pass writes (its tables would
            time another model than the one shipped).
    """
    quant = next((e for e in entries if isinstance(e, Mapping) and e.get("name") == "quantize"), None)
    if quant is None:
        return entries
    out = []
    for entry in entries:
        if not (isinstance(entry, Mapping) and entry.get("name") == "profile" and entry.get("quantized") is True):
            out.append(entry)
            continue
        profile = dict(entry)
        for key in _INT8_FORM:
            shipped = quant.get(key, _default(PASSES["quantize"].Options, key))
            if key not in profile:
                profile[key] = shipped
            elif profile[key] != shipped:
                raise BadInputError(f"{where}: pass 'profile' times int8 with {key} = {profile[key]!r} but the quantize pass "
                                    f"writes {shipped!r}: leave profile.{key} unset (it follows the quantize pass)")
        out.append(profile)
    return out


def parse_pipeline(data: Mapping[str, Any], where: str = "pipeline") -> Pipeline:
    """Validate parsed TOML data and build its passes.

    Raises:
        BadInputError: On any unknown key, pass, parameter, type, value or order problem.
    """
    extra = set(data) - {"pipeline", "pass"}
    if extra:
        raise BadInputError(f"{where}: unknown table(s) {', '.join(sorted(extra))} (expected [pipeline] and [[pass]])")
    head = data.get("pipeline", {})
    if not isinstance(head, Mapping) or set(head) - {"name", "description"}:
        raise BadInputError(f"{where}: [pipeline] takes only 'name' and 'description'")
    entries = data.get("pass", [])
    if not isinstance(entries, list) or not entries:
        raise BadInputError(f"{where}: no passes (add [[pass]] tables)")
    entries = _timed_as_shipped(entries, where)
    passes = tuple(_build_pass(e, f"{where}, pass {i + 1}") for i, e in enumerate(entries))
    check_order(passes, where)
    return Pipeline(str(head.get("name", where)), str(head.get("description", "")), passes)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``PASS.KEY=VALUE`` settings (VALUE in TOML syntax; bare words are strings) to every pass of that name.

    Raises:
        BadInputError: On a malformed setting or a pass the pipeline does not have.
    """
    for item in overrides:
        head, sep, raw = item.partition("=")
        name, dot, key = head.strip().partition(".")
        if not sep or not dot or not name or not key:
            raise BadInputError(f"--set {item!r}: expected PASS.KEY=VALUE (e.g. plan.macs=0.5)")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        targets = [e for e in data.get("pass", []) if isinstance(e, dict) and e.get("name") == name]
        if not targets:
            raise BadInputError(f"--set {item!r}: the pipeline has no '{name}' pass")
        for entry in targets:
            if name == "plan" and key in TARGETS:
                for other in TARGETS:
                    entry.pop(other, None)
            entry[key.strip()] = value
    return data


def _presets_dir() -> Path:
    return Path(str(resources.files("graphprune.pipeline") / "presets"))


def preset_names() -> tuple[str, ...]:
    """The pipeline presets shipped with the package (``passes/*.toml`` in the repository)."""
    return tuple(sorted(p.stem for p in _presets_dir().glob("*.toml")))


def preset_path(name: str | Path) -> Path:
    """A pipeline file: an existing path, else a shipped preset by name (``hierarchical`` or ``hierarchical.toml``).

    Raises:
        BadInputError: When it is neither.
    """
    path = Path(name)
    if path.is_file():
        return path
    preset = _presets_dir() / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if preset.is_file() and path.parent in (Path("."), Path("passes")):
        return preset
    raise BadInputError(f"{name}: no such pipeline file or preset (presets: {', '.join(preset_names())})")


def with_hidden(data: dict[str, Any], step: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline with ``step`` as its hidden pass: replacing the one it has, else before its first finetune / validate / report pass."""
    entries = [e for e in data.get("pass", []) if isinstance(e, dict)]
    if any(e.get("name") == "hidden" for e in entries):
        entries = [dict(step) if e.get("name") == "hidden" else e for e in entries]
    else:
        at = next((i for i, e in enumerate(entries) if e.get("name") in ("finetune", "validate", "report")), len(entries))
        entries.insert(at, dict(step))
    return {**data, "pass": entries}


def load_pipeline(path: str | Path, overrides: Sequence[str] = (), hidden: Mapping[str, Any] | None = None) -> Pipeline:
    """Read and validate a pipeline TOML file, with optional ``PASS.KEY=VALUE`` overrides and a hidden pass (see :func:`with_hidden`).

    Raises:
        BadInputError: Unreadable file, TOML syntax errors, invalid pipeline.
    """
    p = preset_path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise BadInputError(f"{p}: cannot read pipeline ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{p}: invalid TOML ({exc})") from None
    data = apply_overrides(data, overrides)
    return parse_pipeline(with_hidden(data, hidden) if hidden is not None else data, p.name)


def run_passes(pipeline: Pipeline, ws: Workspace, on_result: Callable[[Pass, PassResult], None] | None = None) -> Workspace:
    """Run every pass in order; each gets the workspace the previous one returned.

    Raises:
        RuntimeError: A pass that declares it changes no model reported a change (a bug in that pass).
    """
    for p in pipeline.passes:
        result = p(ws)
        if result.modified and not p.mutates:
            raise RuntimeError(f"the {p.name} pass declares it changes no model, but it did")
        ws = result.workspace
        if on_result is not None:
            on_result(p, result)
    return ws
