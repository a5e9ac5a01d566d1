"""
Every Python block of README.md and docs/*.md runs as written, offline, on the CPU; shell blocks name files that exist.

Conventions in the Markdown (an HTML comment on the line right before a ```python fence, invisible when rendered):

- no marker: the block runs, in a fresh namespace, in a temporary working directory;
- `<!-- docs-test: skip (reason) -->`: the block is not run (say why, e.g. "needs a GPU and the Hub", and say so in the
  visible text too); the next Python block of the page must be a runnable twin, e.g. the same recipe on the bundled
  toy model. Skipped blocks are still compiled and checked for undefined names;
- `<!-- docs-test: continue -->`: the block runs in the namespace of the block before it (a tutorial in parts).

A block that stops running, a marker that is not understood, or a Python block that is neither run nor skipped with
a reason fails these tests.
"""

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PYTHON_LANGUAGES = {"python", "py", "python3"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^\s`]*)")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip\s*\((.*)\)$")


@dataclass
class Block:
    path: Path
    index: int  # among the Python blocks of its file, from 0
    line: int  # line number of the block's first code line
    code: str
    action: str = "run"  # "run", "skip" or "continue"
    reason: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:block{self.index}"


@dataclass
class Page:
    path: Path
    python: list = field(default_factory=list)
    fences: list = field(default_factory=list)  # (line, language, code) of every fenced block
    errors: list = field(default_factory=list)


def parse(path: Path) -> Page:
    """The fenced blocks of a Markdown file, with the docs-test marker of each Python block."""
    page = Page(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    pending = None  # (line number, marker text) of a marker waiting for its fence
    number = 0
    while number < len(lines):
        text = lines[number]
        marker = MARKER.match(text)
        fence = FENCE.match(text)
        if marker:
            if pending:
                page.errors.append(f"line {pending[0]}: marker not followed by a Python block")
            pending = (number + 1, marker.group(1))
            number += 1
            continue
        if not fence:
            if pending and text.strip():
                page.errors.append(f"line {pending[0]}: marker not directly before a Python block")
                pending = None
            number += 1
            continue
        delimiter, language = fence.group(1), fence.group(2).lower()
        end = number + 1
        while end < len(lines) and not lines[end].strip().startswith(delimiter):
            end += 1
        code = "\n".join(lines[number + 1 : end]) + "\n"
        page.fences.append((number + 1, language, code))
        if language in PYTHON_LANGUAGES:
            block = Block(path, len(page.python), number + 2, code)
            if pending:
                directive = pending[1]
                skip = SKIP.match(directive)
                if skip and skip.group(1).strip():
                    block.action, block.reason = "skip", skip.group(1).strip()
                elif directive == "continue":
                    block.action = "continue"
                else:
                    page.errors.append(
                        f"line {pending[0]}: unknown marker {directive!r} (use 'skip (reason)' or 'continue')"
                    )
            page.python.append(block)
        elif pending:
            page.errors.append(f"line {pending[0]}: marker before a {language or 'plain'} block, not a Python one")
        pending = None
        number = end + 1
    if pending:
        page.errors.append(f"line {pending[0]}: marker at the end of the file")
    return page


PAGES = [parse(path) for path in DOC_FILES]


def chains(page: Page) -> list:
    """The runnable blocks of a page, each with the `continue` blocks that follow it: one test each."""
    groups = []
    for block in page.python:
        if block.action == "run":
            groups.append([block])
        elif block.action == "continue" and groups and groups[-1][-1].index == block.index - 1:
            groups[-1].append(block)
    return groups


RUNNABLE = [chain for page in PAGES for chain in chains(page)]


def test_every_python_block_is_run_or_skipped_with_a_reason():
    problems = []
    for page in PAGES:
        name = page.path.relative_to(ROOT)
        problems += [f"{name}: {error}" for error in page.errors]
        for line, language, _ in page.fences:
            if not language:
                problems.append(f"{name}:{line}: a fence without a language (say python, bash, text, ...)")
        run = {block.index for chain in chains(page) for block in chain}
        for block in page.python:
            if block.action == "skip":
                following = page.python[block.index + 1] if block.index + 1 < len(page.python) else None
                if following is None or following.action != "run":
                    problems.append(f"{block.name}: skipped ({block.reason}) without a runnable twin right after it")
            elif block.index not in run:
                problems.append(f"{block.name}: 'continue' does not follow a block that runs")
    assert not problems, "\n".join(problems)
    assert len(RUNNABLE) >= 8, [chain[0].name for chain in RUNNABLE]  # the parser still finds the blocks


def test_markers_are_read_as_documented(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- docs-test: skip (needs a GPU and the Hub) -->\n```python\nhub()\n```\n\n"
        "```python\na = 1\n```\n<!-- docs-test: continue -->\n```python\nb = a\n```\n\n"
        "<!-- docs-test: skip () -->\n```python\nc = 1\n```\n"
        "<!-- docs-test: sikp (typo) -->\n```python\nd = 1\n```\n"
        "<!-- docs-test: skip (a shell block) -->\n```bash\nls\n```\n"
        "<!-- docs-test: continue -->\nA paragraph in between.\n```python\ne = 1\n```\n```\nno language\n```\n"
    )
    parsed = parse(page)
    assert [(block.action, block.reason) for block in parsed.python] == [
        ("skip", "needs a GPU and the Hub"),
        ("run", None),
        ("continue", None),
        ("run", None),  # an empty reason is an error, not a skip
        ("run", None),  # so is an unknown marker
        ("run", None),  # a marker separated from its block by text is an error
    ]
    assert parsed.python[1].line == 9 and parsed.python[1].code == "a = 1\n"
    assert [[block.index for block in chain] for chain in chains(parsed)] == [[1, 2], [3], [4], [5]]
    assert len(parsed.errors) == 4, parsed.errors
    assert parsed.fences[-1][1] == ""


@pytest.fixture
def reward_registry():
    """Blocks may register rewards by name; the registry is restored after each block."""
    from diffusion_opd_trainer.rewards import registry

    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.mark.parametrize("chain", RUNNABLE, ids=[chain[0].name for chain in RUNNABLE])
def test_python_block_runs(chain, tmp_path, monkeypatch, reward_registry):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    namespace = {"__name__": "__main__"}
    for block in chain:
        # Padded so that tracebacks give the Markdown file's line numbers.
        code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
        exec(code, namespace)


def test_skipped_blocks_compile_and_define_every_name(tmp_path):
    """The blocks that need a GPU and the Hub are not run, but they are complete programs: no undefined name."""
    pytest.importorskip("ruff")
    files = []
    for page in PAGES:
        for block in page.python:
            if block.action == "skip":
                compile(block.code, block.name, "exec")
                file = tmp_path / f"{block.name.replace('/', '_').replace(':', '_')}.py"
                file.write_text(block.code)
                files.append(file)
    assert files
    command = [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F821", "--output-format", "concise"]
    result = subprocess.run([*command, *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Arguments that name something a command writes, not a file it reads.
OUTPUT_OPTIONS = {"--output_dir", "--output-dir", "--picture", "-o", "--output"}
INPUT_SUFFIXES = (".py", ".yaml", ".yml", ".txt", ".toml", ".cfg", ".json", ".md")


def test_shell_blocks_name_files_that_exist():
    missing = []
    for page in PAGES:
        name = page.path.relative_to(ROOT)
        for line, language, code in page.fences:
            if language not in SHELL_LANGUAGES:
                continue
            for offset, command in enumerate(code.splitlines()):
                tokens = shlex.split(command, comments=True)
                for previous, token in zip([None, *tokens], tokens):
                    if previous in OUTPUT_OPTIONS or token.startswith(("/", "-", "$")) or "<" in token:
                        continue
                    if previous == "-m":
                        module = ROOT / token.replace(".", "/")
                        if token.split(".")[0] in {"benchmarks", "diffusion_opd_trainer"} and not (
                            module.with_suffix(".py").is_file() or (module / "__init__.py").is_file()
                        ):
                            missing.append(f"{name}:{line + 1 + offset}: module {token}")
                    elif token.endswith(INPUT_SUFFIXES) and not (ROOT / token).exists():
                        missing.append(f"{name}:{line + 1 + offset}: {token}")
    assert not missing, "\n".join(missing)


def test_config_files_named_in_the_docs_and_the_package_exist():
    """Every `examples/configs/*.yaml` that a page, a docstring or a comment cites is there."""
    sources = [*DOC_FILES, *sorted((ROOT / "diffusion_opd_trainer").rglob("*.py"))]
    missing = set()
    for source in sources:
        for path in re.findall(r"examples/configs/[\w.-]+\.ya?ml", source.read_text(encoding="utf-8")):
            if not (ROOT / path).is_file():
                missing.add(f"{source.relative_to(ROOT)}: {path}")
    assert not missing, sorted(missing)
