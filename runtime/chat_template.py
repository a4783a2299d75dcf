"""The model's own chat template (Jinja, stored in the bundle), rendered in a sandbox."""

from __future__ import annotations

from .errors import PocketLMError


def render(template: str | None, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    if not template:
        raise PocketLMError("this bundle has no chat template; use `pocketlm generate` with a plain prompt instead")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def _raise(message: str):
    raise PocketLMError(f"chat template: {message}")
