"""The modeling file uploaded with a pruned transformer, generated from the package's own modules.

A plan that removes components inside blocks needs the pruned classes to load. So that a
reader with only Diffusers can load it (``trust_remote_code=True``), the exported
``transformer/`` folder carries ``hprune_transformer.py``: the modules below, in this order,
joined into one file with their imports of each other removed (every name they import
from each other is defined earlier in the same file) and their registrations with the
``diffusers`` module dropped (Diffusers finds the class through ``auto_map`` and
``model_index.json`` instead). Nothing is written twice: the file is this package's source,
of the installed version, and :func:`modeling_source` refuses to join modules whose
top-level names collide.
"""

from __future__ import annotations

import ast
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from diffusers_hprune.architecture import registered_families
from diffusers_hprune.utils.errors import HPruneError

#: The file name (and module name) of the modeling code in an exported ``transformer/`` folder.
MODULE_NAME = "hprune_transformer"

_PACKAGE = "diffusers_hprune"
# What every family's classes need, before the families' structure modules and after them.
_SHARED_STRUCTURE = (
    "diffusers_hprune.utils.errors",
    "diffusers_hprune.utils.compat",
    "diffusers_hprune.utils.checks",
    "diffusers_hprune.utils.untrusted",
    "diffusers_hprune.utils.interrupts",
    "diffusers_hprune.utils.fileio",
    "diffusers_hprune.plan",
    "diffusers_hprune.architecture.checkpoints",
    "diffusers_hprune.architecture.base",
    "diffusers_hprune.architecture.mmdit",
    "diffusers_hprune.architecture.published",
    "diffusers_hprune.architecture",
)
_REGISTRATION = "diffusers_hprune.families"  # registers the built-in families (one line each)
_SHARED_MODEL = ("diffusers_hprune.utils.live_memory", "diffusers_hprune.utils.nf4_cpu", "diffusers_hprune.models.pruned")


def _modules() -> tuple[str, ...]:
    """The package modules the pruned transformer classes need, each after the ones it imports: the shared ones,
    then each built-in family's structure module (the one that defines its family object), the registration,
    the shared model code, then each family's model module (``ModelFamily.model_module``). A family registered
    from outside the package is not joined: its own package is not part of this file."""
    builtin = [f for f in registered_families() if type(f).__module__.startswith(_PACKAGE + ".")]
    return (*_SHARED_STRUCTURE, *(type(f).__module__ for f in builtin), _REGISTRATION, *_SHARED_MODEL,
            *(f.model_module for f in builtin))


#: The package modules joined into the modeling file, in order.
MODULES = _modules()
_DROPPED_CALLS = {"register"}  # utils.registration.register: attaches a class to the diffusers module


class RemoteCodeError(HPruneError):
    """The package's modules cannot be joined into one modeling file."""


def _package_version() -> str:
    try:
        return version("diffusers-hprune")
    except PackageNotFoundError:
        return "unknown"


def _is_own_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] == _PACKAGE
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == _PACKAGE for alias in node.names)
    return False


def _dropped(node: ast.stmt) -> bool:
    """Statements that do not go into the joined file."""
    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        return True
    if _is_own_import(node):
        return True
    if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
        return True
    call = node.value if isinstance(node, ast.Expr) else None
    return isinstance(call, ast.Call) and getattr(call.func, "id", None) in _DROPPED_CALLS


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def _external_imports(node: ast.stmt) -> dict[str, str]:
    """Names an import statement binds -> what they are (so the same import twice is no collision)."""
    if isinstance(node, ast.Import):
        return {(a.asname or a.name.split(".")[0]): a.name for a in node.names}
    if isinstance(node, ast.ImportFrom):
        return {(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names}
    return {}


def modeling_source() -> str:
    """The text of ``hprune_transformer.py``: the pruned transformer classes and all they need, in one file."""
    defined: dict[str, str] = {}
    imported: dict[str, str] = {}
    parts = []
    for name in MODULES:
        module = import_module(name)
        path = Path(module.__file__)
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        tree = ast.parse(text)
        drop = set()
        for node in tree.body:
            if _is_own_import(node):
                for alias in getattr(node, "names", []):
                    if alias.asname and alias.asname != alias.name:
                        raise RemoteCodeError(f"{name} imports {alias.name} as {alias.asname}; the joined modeling "
                                              "file needs the package's names unchanged.")
            if _dropped(node):
                drop.update(range(node.lineno - 1, node.end_lineno))
                continue
            for bound, what in _external_imports(node).items():
                if imported.setdefault(bound, what) != what or bound in defined:
                    raise RemoteCodeError(f"{name} binds {bound!r} to {what}, which another module of the modeling "
                                          "file defines differently; rename one of them.")
            for top in _defined_names(node):
                if top in defined and defined[top] != name:
                    raise RemoteCodeError(f"{name} and {defined[top]} both define {top!r} at the top level; the "
                                          "modeling file joins them into one namespace, so rename one of them.")
                if top in imported:
                    raise RemoteCodeError(f"{name} defines {top!r}, a name another module imports; rename it.")
                defined[top] = name
        body = "".join(line for i, line in enumerate(lines) if i not in drop).strip("\n")
        parts.append(f"# {'-' * 24} {name} {'-' * 24}\n\n{body}\n")
    classes = [n for n in defined if n.startswith("HierarchicalPruned") and n.endswith("Transformer2DModel")]
    header = (
        f'"""Pruned transformer classes of diffusers-hprune {_package_version()}, for loading with stock Diffusers.\n\n'
        "Generated by diffusers-hprune (`hprune export`, `hprune push`) from its own source: the modules named in\n"
        "the section lines below, joined into one file. Do not edit it: export the model again instead.\n\n"
        "Diffusers runs this file only when you allow it:\n\n"
        "    DiffusionPipeline.from_pretrained(REPO, trust_remote_code=True)\n"
        '    AutoModel.from_pretrained(REPO, subfolder="transformer", trust_remote_code=True)\n\n'
        "The other way: install diffusers-hprune (it is not on PyPI: `pip install .` in a checkout of its source)\n"
        "and load the pipeline folder this one was exported from, after `import diffusers_hprune`, with no remote\n"
        "code. A plan that removes whole blocks only exports to the stock classes (`hprune export --stock`).\n"
        '"""\n\nfrom __future__ import annotations\n\n'
    )
    return header + "\n\n".join(parts) + f"\n\n__all__ = {sorted(classes)!r}\n"


__all__ = ["MODULES", "MODULE_NAME", "RemoteCodeError", "modeling_source"]

