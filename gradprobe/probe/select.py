"""Which parameters a probe watches, and how they are grouped into modules and roles."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gradprobe.errors import InputError

#: The canonical roles a model adapter may declare.
ROLES = ("vision", "projector", "language", "head")

RoleOf = Callable[[str], "str | None"]
ModuleOf = Callable[[str], str]

_INDEX = re.compile(r"^\d+$")


def default_module_of(name: str) -> str:
    """Map a parameter name to a stable dotted module key.

    Parameters inside a numbered container are grouped at the first numbered
    block (``model.language_model.layers.3.mlp.up_proj.weight`` →
    ``model.language_model.layers.3``); others at their owning module
    (``lm_head.weight`` → ``lm_head``, ``model.visual.merger.mlp.0.weight`` →
    ``model.visual.merger``).
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if _INDEX.match(part) and i > 0:
            # a numbered block; but a numbered layer directly inside a small
            # sub-module (merger.mlp.0) belongs to that sub-module's owner
            owner = parts[i - 1]
            if owner in ("layers", "blocks", "h", "layer", "block", "resblocks"):
                return ".".join(parts[: i + 1])
            return ".".join(parts[: max(i - 1, 1)])
    if len(parts) == 1:
        return parts[0]
    return ".".join(parts[:-1])


@dataclass(frozen=True)
class Selection:
    """The parameters a probe watches, with their module key and role."""

    names: tuple[str, ...]
    params: tuple[torch.nn.Parameter, ...]
    modules: tuple[str, ...]  # per parameter
    roles: tuple[str | None, ...]  # per parameter

    def __len__(self) -> int:
        return len(self.names)

    @property
    def module_names(self) -> list[str]:
        """Module keys in first-seen order."""
        return list(dict.fromkeys(self.modules))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def _compile(patterns: str | Sequence[str] | None, what: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise InputError(f"{what}: invalid regular expression {p!r}: {e}") from None
    return out


def check_selection(include: str | Sequence[str] | None, exclude: str | Sequence[str] | None,
                    roles: str | Sequence[str] | None) -> tuple[list[re.Pattern[str]], list[re.Pattern[str]], list[str]]:
    """The selection filters, checked without a model: compiled regexes and known role names.

    Raises:
        InputError: a bad regex or an unknown role.
    """
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    if isinstance(roles, str):
        roles = [r.strip() for r in roles.split(",") if r.strip()]
    roles = list(roles or [])
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise InputError(f"roles: unknown role {bad[0]!r}; known roles are {', '.join(ROLES)}")
    return inc, exc, roles


def select_parameters(
    model: torch.nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    roles: str | Sequence[str] | None = None,
    role_of: RoleOf | None = None,
    module_of: ModuleOf | None = None,
) -> Selection:
    """Choose the parameters to probe.

    Args:
        model: any module.
        include: regexes; a parameter is kept if one matches (``re.search``). None keeps all.
        exclude: regexes; a parameter is dropped if one matches.
        roles: keep only parameters whose role (from ``role_of``) is one of these.
        role_of: maps a parameter name to its role (``vision``, ``projector``,
            ``language``, ``head``) or None; model adapters provide it.
        module_of: maps a parameter name to its module key (default :func:`default_module_of`).

    Raises:
        InputError: bad regex, unknown role, roles without ``role_of``, or nothing selected.
    """
    inc, exc, roles = check_selection(include, exclude, roles)
    if roles and role_of is None:
        raise InputError("roles: this model has no adapter that declares parameter roles; use include/exclude")
    module_of = module_of or default_module_of
    names, params, modules, rl = [], [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        if inc and not any(r.search(name) for r in inc):
            continue
        if exc and any(r.search(name) for r in exc):
            continue
        role = role_of(name) if role_of is not None else None
        if roles and role not in roles:
            continue
        seen.add(id(p))
        names.append(name)
        params.append(p)
        modules.append(module_of(name))
        rl.append(role)
    if not names:
        raise InputError("no parameters selected: the include/exclude/roles filters matched nothing trainable")
    return Selection(tuple(names), tuple(params), tuple(modules), tuple(rl))
