"""
Griffe extension: reads the library's Hugging Face-style docstrings with Griffe's Google parser.

The docstrings follow transformers' conventions, which the Google parser does not know:

- `name (`type`, *optional*, defaults to `x`):` entries: the type (backticks dropped) stays in the parentheses, and
  the qualifiers start the description: `name (type): (*optional*, defaults to `x`) description`;
- an entry whose parenthesis runs over several lines is joined onto one line;
- several parameters in one entry (`height (`int`), width (`int`): ...` or `tasks, reward_funcs: ...`) become one
  entry each, with the same description;
- an entry without a description (`clip_model (`str`).`) gets an empty one;
- `> Group` lines, which group the parameters of a long config, are dropped (a parameter list has no subheadings;
  the parameters keep their order);
- `[`~module.Name`]` and `[`Name`]` references render as the code span `` `Name` `` (the short name, as the
  Hugging Face doc builder shows them).

Only the text handed to the parser changes; the source is untouched.
"""

import re

from griffe import Extension


SECTION = re.compile(r"^(?P<indent>\s*)(Args|Arguments|Parameters|Params|Other Parameters):\s*$")
GROUP = re.compile(r"^\s*>\s")
REFERENCE = re.compile(r"\[`~?(?P<path>[\w.]+)`\]")
NAME = re.compile(r"^\*{0,2}\w+$")
QUALIFIER = re.compile(r"^(\*optional\*|optional|defaults to .*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_top_level(text: str, separator: str = ",") -> list[str]:
    """Splits `text` at `separator` outside parentheses, brackets and backtick spans."""
    parts, depth, in_code, current = [], 0, False, []
    for char in text:
        if char == "`":
            in_code = not in_code
        elif not in_code and char in "([{":
            depth += 1
        elif not in_code and char in ")]}":
            depth -= 1
        if char == separator and depth == 0 and not in_code:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _head_end(line: str) -> int:
    """Index of the colon that ends an entry's head (`name (type)`), outside parentheses and code; -1 if none."""
    depth, in_code = 0, False
    for index, char in enumerate(line):
        if char == "`":
            in_code = not in_code
        elif not in_code and char in "([{":
            depth += 1
        elif not in_code and char in ")]}":
            depth -= 1
        elif char == ":" and depth == 0 and not in_code:
            return index
    return -1


def _parenthesis_open(text: str) -> bool:
    depth, in_code = 0, False
    for char in text:
        if char == "`":
            in_code = not in_code
        elif not in_code and char == "(":
            depth += 1
        elif not in_code and char == ")":
            depth -= 1
    return depth > 0


def _entry(head: str) -> tuple[str, str]:
    """`name (type, qualifiers...)` -> `("name (type)", "(qualifiers) ")`."""
    head = head.strip()
    if "(" not in head or not head.endswith(")"):
        return head, ""
    name, inner = head.split("(", 1)
    parts = [part.strip() for part in _split_top_level(inner[:-1])]
    if not all(QUALIFIER.match(part) for part in parts[1:]):
        parts = [inner[:-1].strip()]  # an enumeration of types ("callable, registry name, or dict"): all type
    kind = parts[0].replace("`", "")
    qualifiers = ", ".join(part for part in parts[1:] if part)
    if kind.startswith("*") and kind.endswith("*"):  # `(*optional*)` alone: no type
        return name.strip(), f"({kind}{', ' + qualifiers if qualifiers else ''}) "
    return f"{name.strip()} ({kind})", f"({qualifiers}) " if qualifiers else ""


def _rewrite_entry(first: str, rest: list[str], indent: str) -> list[str]:
    colon = _head_end(first)
    if colon < 0:
        head, description = first.rstrip().rstrip("."), ""
    else:
        head, description = first[:colon], first[colon + 1 :].strip()
    names = [part.strip() for part in _split_top_level(head)]
    entries = []
    for part in names:
        name = part.split("(", 1)[0].strip()
        if not NAME.match(name):
            return [first, *rest]  # not an entry this extension understands: leave it to the parser
        entries.append(_entry(part))
    lines = []
    for entry, qualifiers in entries:
        lines.append(f"{indent}{entry}: {qualifiers}{description}".rstrip())
        lines.extend(rest)
    return lines


def _rewrite_section(lines: list[str]) -> list[str]:
    """The body lines of a parameters section, rewritten."""
    body = []
    for line in lines:
        if GROUP.match(line) or (not line.strip() and (not body or not body[-1].strip())):
            continue  # a group heading, or a blank line first or after another (the parser needs an entry first)
        body.append(line)
    indents = [len(line) - len(line.lstrip()) for line in body if line.strip()]
    if not indents:
        return body
    item_indent = min(indents)
    out, index = [], 0
    while index < len(body):
        line = body[index]
        if not line.strip() or len(line) - len(line.lstrip()) != item_indent:
            out.append(line)
            index += 1
            continue
        first = line.strip()
        index += 1
        while _parenthesis_open(first) and index < len(body) and body[index].strip():
            first += " " + body[index].strip()
            index += 1
        rest = []
        while index < len(body) and (not body[index].strip() or _indent(body[index]) > item_indent):
            rest.append(body[index])
            index += 1
        out.extend(_rewrite_entry(first, rest, " " * item_indent))
    return out


def rewrite(text: str) -> str:
    """A Hugging Face-style docstring, as the Google parser reads it."""
    text = REFERENCE.sub(lambda match: f"`{match.group('path').split('.')[-1]}`", text)
    lines = text.split("\n")
    out, index = [], 0
    while index < len(lines):
        match = SECTION.match(lines[index])
        out.append(lines[index])
        index += 1
        if not match:
            continue
        indent = len(match.group("indent"))
        start = index
        while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > indent):
            index += 1
        out.extend(_rewrite_section(lines[start:index]))
    return "\n".join(out)


class HFDocstrings(Extension):
    """Rewrites each docstring of the loaded objects before the Google parser reads it."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
