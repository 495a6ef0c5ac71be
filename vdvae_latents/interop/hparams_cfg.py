"""A safe reader for the official Efficient-VDVAE ``hparams-<run>.cfg`` files.

The official code keeps its hyper-parameters in an INI file whose values its
``hparams`` library evaluates as Python expressions: ``[1] * 11 + [2]``, ``(1, 1)``,
``'cifar-10'``, ``8.``, ``True``, ``32 * 2``. Evaluating user text is not an option
here, so values are parsed with :mod:`ast` and only a whitelist is computed: literals
(numbers, strings, booleans, None), lists and tuples of those, unary +/-, and binary
arithmetic on numbers plus list/tuple concatenation and repetition. Anything else (a
call, an attribute, a comprehension, a name) is refused with the key it belongs to,
except that a value that is one bare word reads as that word, as the authors' library
does (``name = cifar10_incfilters``), and the run ``name`` is always a string.
Repetitions and powers are capped, so ``[0] * 10**12`` and ``((9**64)**64)**64`` cannot exhaust memory.
"""

from __future__ import annotations

import ast
import configparser
import operator
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

__all__ = ["parse_hparams", "read_hparams", "parse_value"]

MAX_SEQUENCE = 100_000  # longest list a value may build (the configs have < 100 entries)
MAX_EXPONENT = 64       # largest power allowed in ``a ** b``
MAX_POWER_BITS = 1024   # largest integer ``a ** b`` may build (powers of powers would not end)

_NUMBER_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


class _Refused(Exception):
    """A value outside the whitelist; the message says what was found."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (bool, int, float, str)):
            return node.value
        raise _Refused(f"a {type(node.value).__name__} literal")
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_evaluate(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        if not _is_number(value):
            raise _Refused("a sign in front of something that is not a number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        return _binary(node.op, _evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.Name):
        raise _Refused(f"the name '{node.id}'")
    raise _Refused(f"a {type(node).__name__} expression")


def _binary(op: ast.operator, left: Any, right: Any) -> Any:
    sequences = (list, tuple)
    if _is_number(left) and _is_number(right):
        if isinstance(op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise _Refused(f"a power above {MAX_EXPONENT}")
        if isinstance(op, ast.Pow) and isinstance(left, int) and left.bit_length() * right > MAX_POWER_BITS:
            raise _Refused(f"a power above 2 ** {MAX_POWER_BITS}")
        if type(op) not in _NUMBER_OPS:
            raise _Refused(f"the operator {type(op).__name__}")
        try:
            return _NUMBER_OPS[type(op)](left, right)
        except ArithmeticError as exc:
            raise _Refused(f"arithmetic that fails ({exc})") from None
    if isinstance(op, ast.Add) and isinstance(left, sequences) and type(left) is type(right):
        if len(left) + len(right) > MAX_SEQUENCE:
            raise _Refused(f"a list longer than {MAX_SEQUENCE}")
        return left + right
    if isinstance(op, ast.Mult):
        seq, times = (left, right) if isinstance(left, sequences) else (right, left)
        if isinstance(seq, sequences) and isinstance(times, int) and not isinstance(times, bool):
            if len(seq) * max(times, 0) > MAX_SEQUENCE:
                raise _Refused(f"a list longer than {MAX_SEQUENCE}")
            return seq * times
    raise _Refused(f"the operator {type(op).__name__} between {type(left).__name__} and {type(right).__name__}")


def parse_value(text: str, *, key: str = "value") -> Any:
    """One ``.cfg`` value as the authors' library reads it, without evaluating code.

    Raises :class:`ConfigError` naming ``key`` when the text is not a whitelisted
    literal expression.
    """
    source = text.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError):
        raise ConfigError(f"hparams value '{key}' is not a Python literal expression: {source[:60]!r}.") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"hparams value '{key}' is nested too deeply.") from None
    if isinstance(tree.body, ast.Name):
        return source  # a bare word is a string, as the authors' library reads it
    try:
        return _evaluate(tree)
    except _Refused as why:
        raise ConfigError(f"hparams value '{key}' contains {why}, which a config value may not hold.") from None
    except RecursionError:
        raise ConfigError(f"hparams value '{key}' is nested too deeply.") from None


def parse_hparams(text: str, *, source: str = "hparams") -> dict[str, dict[str, Any]]:
    """Parse the text of a ``.cfg`` file into ``{section: {key: value}}``.

    Sections and keys keep the file's spelling (keys lower-cased, as ConfigParser
    does); comments and blank lines are ignored; multi-line values are joined.
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"hparams file {source} is not a valid .cfg file ({first_line}).") from None
    out: dict[str, dict[str, Any]] = {}
    for section in parser.sections():
        values: dict[str, Any] = {}
        for key, raw in parser.items(section, raw=True):
            if key == "name":
                values[key] = raw.strip()
            else:
                values[key] = parse_value(raw, key=f"{section}.{key}")
        out[section] = values
    return out


def read_hparams(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and parse an ``hparams-<run>.cfg`` file (see :func:`parse_hparams`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"hparams file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"hparams file {path} cannot be read as text ({type(exc).__name__}).") from None
    return parse_hparams(text, source=str(path))
