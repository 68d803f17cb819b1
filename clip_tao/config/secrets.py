"""Keep secrets out of what we write: experiment.yaml, checkpoints' ``config``, exports' ``_config.yaml``.

A spec may read a secret from the environment (``${oc.env:AWS_SECRET_ACCESS_KEY}``) or from another resolver.
The run uses the resolved value, but every file we write carries the expression as the user wrote it, so
the value never lands on disk. Keys whose name says they hold a secret are masked whatever their value.
"""

from __future__ import annotations

import re
from typing import Any

# ``${name:...}``: an interpolation that calls a resolver (oc.env, oc.decode, a user's own).
_RESOLVER_CALL = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")
# ``${a.b}`` / ``${.sibling}``: a plain reference to another key.
_REFERENCE = re.compile(r"\$\{\s*([\w.\[\]]+)\s*\}")
# Key names (split at "_") that hold secrets: ``encryption_key``, ``api_key``, ``hf_token``; not ``tokenizer_path``.
_SECRET_WORDS = {"secret", "password", "passwd", "token", "credential", "credentials"}
_KEY_KINDS = {"api", "access", "encryption", "secret", "private"}
MASK = "***"

Path = tuple[Any, ...]


def written_expressions(unresolved: Any) -> dict[Path, str]:
    """Leaves of the unresolved spec whose value comes from a resolver, directly or through references.

    ``unresolved`` is the spec as plain data with interpolations left as strings. Returns path -> expression.
    """
    leaves = dict(_leaves(unresolved))
    by_dotted = {".".join(str(p) for p in path): path for path in leaves}
    tainted = {path: text for path, text in leaves.items() if isinstance(text, str) and _RESOLVER_CALL.search(text)}
    changed = True
    while changed:  # a key that refers to a tainted key is tainted too
        changed = False
        for path, text in leaves.items():
            if path in tainted or not isinstance(text, str):
                continue
            for ref in _REFERENCE.findall(text):
                target = by_dotted.get(ref.lstrip("."))
                if target is None and ref.startswith("."):  # relative to the same parent
                    target = by_dotted.get(".".join(str(p) for p in (*path[:-1], ref.lstrip("."))))
                if target in tainted:
                    tainted[path] = text
                    changed = True
                    break
    return tainted


def protect(data: Any, expressions: dict[Path, str]) -> Any:
    """``data`` (the resolved config as plain data) with expressions put back and secret-named keys masked."""
    return _protect(data, expressions, ())


def _protect(data: Any, expressions: dict[Path, str], path: Path) -> Any:
    if path in expressions:
        return expressions[path]
    if isinstance(data, dict):
        return {k: MASK if _is_secret(k, v) else _protect(v, expressions, (*path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_protect(v, expressions, (*path, i)) for i, v in enumerate(data)]
    return data


def _is_secret(key: Any, value: Any) -> bool:
    if not (isinstance(key, str) and isinstance(value, str) and value):
        return False
    parts = key.lower().split("_")
    return bool(_SECRET_WORDS & set(parts)) or (len(parts) > 1 and parts[-1] == "key" and parts[-2] in _KEY_KINDS)


def _leaves(data: Any, path: Path = ()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _leaves(v, (*path, i))
    else:
        yield path, data
