"""A recipe (TOML) names the source, the stages with their settings, the target and the output folder.

Unknown keys are refused (a typo must not silently fall back to a default). Settings a recipe leaves
out come from the target profile (cache sizes, threads), then from pocketlm's defaults. Relative
paths in a recipe are relative to the recipe file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from pocketlm.runtime.errors import PocketLMError
from pocketlm.runtime.targets import Target, load_target

DEFAULT_TARGET = "generic-x86-cpu"


@dataclass
class ExportSettings:
    backends: list[str] = field(default_factory=lambda: ["onnx", "executorch"])
    sink_size: int | None = None
    window_size: int | None = None
    chunk: int | None = None


@dataclass
class ValidateSettings:
    text: str | None = None


@dataclass
class ProfileSettings:
    threads: list[int] | None = None
    prompt_tokens: int = 128
    new_tokens: int = 64
    runs: int = 3


@dataclass
class QuantizeSettings:
    scheme: str = "w4-awq"
    group_size: int | None = 64
    asymmetric: bool = False
    head: str | None = None  # the scheme's default (toolchain.quantize.scheme_head)
    calib: str | None = None
    awq_results: str | None = None
    onnx_int4: str = "auto"


@dataclass
class Recipe:
    source: str = "default"
    target: str = DEFAULT_TARGET
    out: str = "out/pocketlm"
    export: ExportSettings = field(default_factory=ExportSettings)
    validate: ValidateSettings = field(default_factory=ValidateSettings)
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    quantize: QuantizeSettings | None = None

    def resolved_target(self) -> Target:
        return load_target(self.target)

    def cache(self, target: Target) -> dict:
        """Cache sizes: the recipe's, else the target's."""
        e = self.export
        return {k: getattr(e, k) if getattr(e, k) is not None else target.cache[k] for k in ("sink_size", "window_size", "chunk")}


SECTIONS = {"export": ExportSettings, "validate": ValidateSettings, "profile": ProfileSettings, "quantize": QuantizeSettings}
TOP_LEVEL = {"source", "target", "out", *SECTIONS}


def load_recipe(path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise PocketLMError(f"recipe '{path}' does not exist; pass a TOML file (see README, 'Recipes')")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise PocketLMError(f"recipe '{path}' is not valid TOML: {e}") from None
    return recipe_from_dict(data, where=str(path), base=path.parent)


def recipe_from_dict(data: dict, where: str = "recipe", base: Path | None = None) -> Recipe:
    _refuse_unknown(data, TOP_LEVEL, where, "top level")
    kw = {}
    for key in ("source", "target", "out"):
        if key in data:
            kw[key] = _typed(data[key], str, where, key)
    for name, cls in SECTIONS.items():
        if name == "quantize" and name not in data:
            continue  # no [quantize] table: no quantization stage
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise PocketLMError(f"{where}: '{name}' must be a table ([{name}]), got {type(section).__name__}")
        allowed = {f.name for f in fields(cls)}
        _refuse_unknown(section, allowed, where, f"[{name}]")
        kw[name] = cls(**section)
    recipe = Recipe(**kw)
    if base is not None:
        if recipe.source != "default" and not Path(recipe.source).is_absolute() and (base / recipe.source).exists():
            recipe.source = str(base / recipe.source)
        if recipe.validate.text and not Path(recipe.validate.text).is_absolute():
            recipe.validate.text = str(base / recipe.validate.text)
        q = recipe.quantize
        for key in ("calib", "awq_results"):
            if q and getattr(q, key) and not Path(getattr(q, key)).is_absolute():
                setattr(q, key, str(base / getattr(q, key)))
        if not Path(recipe.out).is_absolute():
            recipe.out = str(base / recipe.out)
    return recipe


def _refuse_unknown(section: dict, allowed: set, where: str, table: str) -> None:
    extra = sorted(set(section) - allowed)
    if extra:
        raise PocketLMError(
            f"{where}: unknown key '{extra[0]}' at {table}; allowed keys there: {', '.join(sorted(allowed))}"
        )


def _typed(value, kind, where: str, key: str):
    if not isinstance(value, kind):
        raise PocketLMError(f"{where}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value
