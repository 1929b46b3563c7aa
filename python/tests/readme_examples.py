"""Runs the Python examples of a Markdown file in order, as a reader would, and checks them.

Usage: python readme_examples.py README.md

Each ```python block is taken in the order of the file:

- a block whose first line is a comment naming a ``.py`` path (``# etl/orders.py``) is a module:
  it is written to that path under the current directory, with an empty ``__init__.py`` in each
  new package directory, so that later blocks can import it;
- every other block is executed, in one namespace shared by all of them (later blocks see the
  names earlier ones defined), with the current directory first on ``sys.path``.

What a block prints is captured and echoed. A line of a block that is a ``print(...)`` call
ending in a comment, such as ``print(run.output)  # 7.0``, promises that the comment's text
(``7.0``) appears in what that block printed, whole: not as a piece of a longer word or number.

The exit status is 0 when every block ran and kept its promises, 1 otherwise (with the
block's line in the Markdown file and the traceback or the missing text), 2 for bad usage.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import io
import re
import sys
import tokenize
import traceback
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

# An opening code fence (CommonMark: up to 3 spaces, then 3 or more backticks or tildes) and
# its info string.
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
# The first line of a block that is a module to write: a comment naming a relative .py path.
MODULE_HEADER = re.compile(r"^#\s*(?P<path>[\w./-]+\.py)\s*$")


@dataclass(frozen=True)
class Block:
    """One ```python block: the line of its opening fence (from 1) and its source."""

    line: int
    source: str


@dataclass(frozen=True)
class Expectation:
    """A ``print(...)  # text`` line of a block: the line in the Markdown file and the text."""

    line: int
    code: str
    text: str


class ExampleFailed(Exception):
    """A block could not be run or did not keep a promise; the message says which and why."""


def python_blocks(markdown: str) -> list[Block]:
    """The ```python (or ```py) blocks of a Markdown text, in order."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        index += 1
        if opening is None:
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        info = opening["info"].strip()
        if fence[0] == "`" and "`" in info:
            continue  # not a fence: an info string after backticks cannot hold a backtick
        start = index
        body: list[str] = []
        while index < len(lines):
            closing = FENCE.match(lines[index])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[index]
            # Content lines lose up to as many leading spaces as the opening fence had.
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            index += 1
        else:
            raise ExampleFailed(f"line {start}: the code block opened here is never closed")
        index += 1  # the closing fence
        language = info.split()[0].lower() if info else ""
        if language in ("python", "py"):
            blocks.append(Block(line=start, source="\n".join(body) + "\n"))
    return blocks


def module_path(block: Block) -> PurePosixPath | None:
    """The relative path a block is to be written to, if its first line names one."""
    first = block.source.split("\n", 1)[0]
    header = MODULE_HEADER.match(first.strip())
    if header is None:
        return None
    path = PurePosixPath(header["path"])
    if path.is_absolute() or ".." in path.parts:
        raise ExampleFailed(
            f"line {block.line}: {path} is not a path under the current directory"
        )
    return path


def write_module(block: Block, path: PurePosixPath, root: Path) -> None:
    """Writes a module block to ``root/path``, making its directories packages."""
    target = root.joinpath(*path.parts)
    directory = root
    for part in path.parts[:-1]:
        directory = directory / part
        directory.mkdir(exist_ok=True)
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")
    target.write_text(block.source)
    # A directory listing the import system cached before the file existed must be read again.
    importlib.invalidate_caches()


def parse(block: Block) -> ast.Module:
    """The block's syntax tree (line numbers counted from the block's first line).

    Raises:
        ExampleFailed: The block is not valid Python.
    """
    try:
        return ast.parse(block.source)
    except SyntaxError as error:
        line = block.line + (error.lineno or 1)
        raise ExampleFailed(
            f"line {block.line}: the block is not valid Python: {error.msg} (line {line})"
        ) from None


def expectations(block: Block) -> list[Expectation]:
    """The ``print(...)  # text`` lines of a block, with Markdown line numbers."""
    tree = parse(block)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(block.source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = block.source.splitlines()
    found: list[Expectation] = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "print"
            and node.end_lineno is not None
        ):
            continue
        text = comments.get(node.end_lineno)
        if text:
            found.append(
                Expectation(
                    line=block.line + node.end_lineno,
                    code=lines[node.end_lineno - 1].strip(),
                    text=text,
                )
            )
    return sorted(found, key=lambda expectation: expectation.line)


def run_block(block: Block, filename: str, namespace: dict[str, Any]) -> str:
    """Executes a block in ``namespace`` and returns what it printed.

    Raises:
        ExampleFailed: The block raised; the message holds its output and traceback.
    """
    tree = parse(block)
    # Line numbers of the Markdown file, so that tracebacks point into it (and quote it).
    ast.increment_lineno(tree, block.line)
    code = compile(tree, filename, "exec")
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            exec(code, namespace)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # whatever the example raises is its failure
        # Leave out this function's own frame: the traceback starts in the block.
        frames = error.__traceback__.tb_next if error.__traceback__ is not None else None
        trace = "".join(traceback.format_exception(error.with_traceback(frames)))
        raise ExampleFailed(
            f"line {block.line}: the block raised {type(error).__name__}\n"
            f"{echo(output.getvalue())}{trace.rstrip()}"
        ) from None
    return output.getvalue()


def echo(output: str) -> str:
    """What a block printed, indented under its heading (nothing when it printed nothing)."""
    return "".join(f"  | {line}\n" for line in output.splitlines())


def printed(text: str, output: str) -> bool:
    """Whether ``text`` appears in ``output`` whole, not as a piece of a longer word or number
    (``7.0`` is not in ``127.0.0.1``)."""
    before = r"(?<![\w.])" if text[0].isalnum() else ""
    after = r"(?![\w]|\.\w)" if text[-1].isalnum() else ""
    return re.search(before + re.escape(text) + after, output) is not None


def check(block: Block, output: str) -> int:
    """Checks the block's ``print(...)  # text`` promises; returns how many it made."""
    promised = expectations(block)
    for expectation in promised:
        if not printed(expectation.text, output):
            raise ExampleFailed(
                f"line {block.line}: the block did not print {expectation.text!r}, "
                f"as line {expectation.line} promises: {expectation.code}"
            )
    return len(promised)


def run_markdown(markdown_path: Path, root: Path) -> None:
    """Runs every Python block of the Markdown file, writing modules under ``root``."""
    shown = str(markdown_path)
    # Tracebacks name the file by its absolute path, so that its lines are found and quoted
    # whatever the current directory.
    filename = str(markdown_path.resolve())
    blocks = python_blocks(markdown_path.read_text(encoding="utf-8"))
    if not blocks:
        raise ExampleFailed(f"{shown} has no ```python block")
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    written = executed = promises = 0
    for block in blocks:
        path = module_path(block)
        if path is not None:
            write_module(block, path, root)
            written += 1
            print(f"== {shown}:{block.line}: wrote {path}", flush=True)
            continue
        print(f"== {shown}:{block.line}: running", flush=True)
        output = run_block(block, filename, namespace)
        sys.stdout.write(echo(output))
        sys.stdout.flush()
        promises += check(block, output)
        executed += 1
    print(
        f"== {shown}: blocks run: {executed}, modules written: {written}, "
        f"promised outputs printed: {promises}"
    )


def main(argv: list[str]) -> int:
    """Entry point: ``readme_examples.py MARKDOWN``."""
    if len(argv) != 2:
        print(f"usage: {argv[0] if argv else 'readme_examples.py'} MARKDOWN", file=sys.stderr)
        return 2
    markdown_path = Path(argv[1])
    if not markdown_path.is_file():
        print(f"{markdown_path}: no such file", file=sys.stderr)
        return 2
    root = Path.cwd()
    # As for a reader's `python` started here: the current directory comes first on sys.path,
    # and this script's own directory is not on it.
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(root)] + [
        entry for entry in sys.path if entry and Path(entry).resolve() != here
    ]
    try:
        run_markdown(markdown_path, root)
    except ExampleFailed as failure:
        sys.stdout.flush()
        print(f"{markdown_path}: {failure}", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as error:
        sys.stdout.flush()
        print(f"{markdown_path}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
