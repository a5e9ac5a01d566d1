"""
MkDocs hook: links from a page to a repository file outside `docs/` (`../results/toy_table_curves.png`,
`../examples/distill_sd3.py`...).

MkDocs only knows the files under `docs/`, so such a link is reported as not found (an error under `--strict`). This
hook publishes each repository file that a page links to under `repository/<path>` in the site and points the link
there, so images show and files open on the site as in the repository, with no copy in `docs/`.

A link to a repository file that does not exist stays an error (a warning, which `--strict` turns into a failure),
with one exception: files under `results/` are written by the benchmarks (`benchmarks/toy_table.py`...) and are
missing from a checkout while a run that rewrites them is in progress. A missing `results/` file becomes a note
naming it, logged at info level.
"""

import logging
import os
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel


log = logging.getLogger("mkdocs.hooks.repository_files")

SITE_FOLDER = "repository"  # where the linked repository files are published in the site
GENERATED_FOLDERS = ("results/",)  # written by benchmark runs; may be missing while one is in progress

# A Markdown link or image with a plain relative target: [text](target) / ![alt](target), optional "title".
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")

_root: Path = Path(".")
_docs: Path = Path("docs")


def _repository_target(page_path: Path, target: str):
    """`(path relative to the repository, anchor)` when `target` leaves docs/ for the repository, else `None`."""
    if "://" in target or target.startswith(("#", "/", "mailto:")):
        return None
    path, _, anchor = target.partition("#")
    resolved = Path(os.path.normpath(page_path.parent / path))
    if resolved == _docs or _docs in resolved.parents or _root not in resolved.parents:
        return None
    return resolved.relative_to(_root).as_posix(), anchor


def _outside_code(markdown: str):
    """Yields `(line index, line)` of the lines outside fenced code blocks."""
    fence = None
    for index, line in enumerate(markdown.split("\n")):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            yield index, line


def _rewrite_line(line: str, page_path: Path, src_uri: str, found: set, report: bool) -> str:
    spans = [match.span() for match in CODE_SPAN.finditer(line)]

    def replace(match: re.Match) -> str:
        if any(start <= match.start() < end for start, end in spans):
            return match.group(0)
        resolved = _repository_target(page_path, match.group("target"))
        if resolved is None:
            return match.group(0)
        relative, anchor = resolved
        if (_root / relative).is_file():
            found.add(relative)
            depth = src_uri.count("/")
            link = "../" * depth + f"{SITE_FOLDER}/{relative}" + (f"#{anchor}" if anchor else "")
            return f"{match.group('bang')}[{match.group('text')}]({link}{match.group('title') or ''})"
        if relative.startswith(GENERATED_FOLDERS):
            if report:
                message = "%s links to %s, which this checkout lacks (a benchmark writes it): shown as a note"
                log.info(message, src_uri, relative)
            what = match.group("text") or relative
            return f"*({what}: `{relative}`, written by the benchmarks, is not in this checkout)*"
        if report:
            log.warning("%s links to the repository file %s, which does not exist", src_uri, relative)
        return match.group(0)

    return LINK.sub(replace, line)


def _rewrite(markdown: str, page_path: Path, src_uri: str, found: set, report: bool = True) -> str:
    lines = markdown.split("\n")
    for index, line in _outside_code(markdown):
        lines[index] = _rewrite_line(line, page_path, src_uri, found, report)
    return "\n".join(lines)


def on_config(config, **kwargs):
    global _root, _docs
    _root = Path(config.config_file_path).resolve().parent
    _docs = Path(config.docs_dir).resolve()
    return config


def on_files(files, config, **kwargs):
    """Publishes every repository file that a page links to (found before the pages are rendered)."""
    found: set = set()
    for file in files.documentation_pages():
        path = Path(file.abs_src_path)
        _rewrite(path.read_text(encoding="utf-8"), path, file.src_uri, found, report=False)
    for relative in sorted(found):
        files.append(
            File.generated(
                config,
                f"{SITE_FOLDER}/{relative}",
                abs_src_path=str(_root / relative),
                inclusion=InclusionLevel.NOT_IN_NAV,
            )
        )
    return files


def on_page_markdown(markdown, page, config, files, **kwargs):
    return _rewrite(markdown, Path(page.file.abs_src_path), page.file.src_uri, set())
