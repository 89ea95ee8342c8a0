"""The text a perplexity is measured on: a user's file, or `builtin:wiki` (no torch here).

`builtin:wiki` is plain text made from the English Wikipedia excerpt that gensim 4.4.0's wheel ships
as test data (`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`, 206 pages of
article markup). The wheel is read with `zipfile` (gensim is never imported or installed) from:

1. `$KVSCOPE_WHEEL_DIR`, then `$KVSCOPE_CACHE/wheels` (default `~/.cache/kvscope/wheels`), where
   `make` puts it (`pip download --no-deps gensim==4.4.0 -d ~/.cache/kvscope/wheels`);
2. an installed gensim's `test/test_data` folder (found without importing it).

It is never fetched from the network here. The markup is stripped by the deterministic rules of
`strip_wikitext`; articles (namespace 0, not redirects) are joined in file order, each as its title
line and its paragraphs. The chunk is the first N characters, and its sha256 is printed so that two
runs are known to have used the same text.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from kvscope.errors import UsageError

GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
BUILTIN_WIKI = "builtin:wiki"
GET_WHEEL = f"pip download --no-deps gensim=={GENSIM_VERSION} -d {{dir}}"


@dataclass(frozen=True)
class TextChunk:
    text: str
    source: str  # "builtin:wiki (gensim-4.4.0-....whl)" or the file's path
    chars: int
    sha256: str  # of the chunk's UTF-8 bytes
    available_chars: int  # how many characters the source had before the cut

    @classmethod
    def of(cls, text: str, source: str, chars: int | None) -> TextChunk:
        chunk = text if chars is None else text[:chars]
        return cls(chunk, source, len(chunk), hashlib.sha256(chunk.encode("utf-8")).hexdigest(), len(text))


def cache_dir() -> Path:
    """`$KVSCOPE_CACHE`, else `$XDG_CACHE_HOME/kvscope`, else `~/.cache/kvscope`."""
    if os.environ.get("KVSCOPE_CACHE"):
        return Path(os.environ["KVSCOPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvscope"


def wheel_dirs() -> list[Path]:
    dirs = [Path(os.environ["KVSCOPE_WHEEL_DIR"])] if os.environ.get("KVSCOPE_WHEEL_DIR") else []
    return [*dirs, cache_dir() / "wheels"]


def _wiki_bytes() -> tuple[bytes, str]:
    """The excerpt's bz2 bytes and where they came from; UsageError saying how to get them."""
    for folder in wheel_dirs():
        for wheel in sorted(folder.glob(f"gensim-{GENSIM_VERSION}-*.whl")) if folder.is_dir() else []:
            try:
                with zipfile.ZipFile(wheel) as archive:
                    return archive.read(WIKI_MEMBER), wheel.name
            except (zipfile.BadZipFile, KeyError, OSError):
                continue  # a broken download: try the next place
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "test" / "test_data" / Path(WIKI_MEMBER).name
        if path.is_file():
            return path.read_bytes(), str(path)
    target = wheel_dirs()[0]
    raise UsageError(f"{BUILTIN_WIKI} needs the gensim {GENSIM_VERSION} wheel (its test data holds the Wikipedia "
                     f"excerpt) in {target}; get it with: {GET_WHEEL.format(dir=target)}")


# -- wikitext to plain text --------------------------------------------------------------------
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_BLOCK_TAGS = re.compile(r"<(math|gallery|timeline|syntaxhighlight|source|score|imagemap)[^>]*>.*?</\1>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost first: applied until nothing changes
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media):[^\[\]]*\]\]", re.I)
_INTERWIKI = re.compile(r"\[\[[a-z]{2,3}(?:-[a-z]+)?:[^\[\]]*\]\]")
# an ordinary link holding no other link: [[target|label]] -> label, [[target]] -> target
_LINK = re.compile(r"\[\[(?!(?:File|Image|Category|Media):)([^\[\]|]*)\|([^\[\]]*)\]\]"
                   r"|\[\[(?!(?:File|Image|Category|Media):)([^\[\]|]*)\]\]", re.I)
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_SPACES = re.compile(r"[ \t]+")


def strip_wikitext(markup: str) -> str:
    """Plain text from MediaWiki markup: comments, references, templates, tables, files and
    categories dropped; links and external links become their label; headings their title."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    text = _BLOCK_TAGS.sub("", text)
    for pattern in (_TEMPLATE, _TABLE):
        while True:
            text, count = pattern.subn("", text)
            if not count:
                break
    text = _INTERWIKI.sub("", text)
    while True:  # innermost first: file captions hold links, so their links become text, then they go
        text, links = _LINK.subn(lambda m: m.group(2) if m.group(1) is not None else m.group(3), text)
        text, files = _FILE_LINK.subn("", text)
        if not links and not files:
            break
    text = _EXTERNAL.sub(lambda m: m.group(1), text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _TAG.sub("", text)  # tags written as entities (&lt;br&gt;)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\n\1\n", text)  # a heading is a paragraph of its own
    text = _LIST.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    paragraphs, current = [], []
    for line in lines:
        if line and not line.startswith(("|", "!", "{", "}")):
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    # a paragraph of a few characters is what is left of a template or table row
    return "\n\n".join(p for p in paragraphs if len(p) > 1)


def wiki_articles(xml: bytes) -> list[tuple[str, str]]:
    """(title, plain text) of each article (namespace 0, not a redirect), in file order."""
    articles = []
    for _, element in ElementTree.iterparse(_as_file(xml)):
        if not element.tag.endswith("}page"):
            continue
        ns = element.findtext("{*}ns")
        title = element.findtext("{*}title") or ""
        redirect = element.find("{*}redirect")
        markup = element.findtext("{*}revision/{*}text") or ""
        element.clear()
        if ns != "0" or redirect is not None or markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        body = strip_wikitext(markup)
        if body:
            articles.append((title, body))
    return articles


def _as_file(data: bytes):  # noqa: ANN202 - a BytesIO for iterparse
    import io

    return io.BytesIO(data)


def wiki_text() -> tuple[str, str]:
    """The whole plain text of `builtin:wiki` and its source."""
    raw, source = _wiki_bytes()
    articles = wiki_articles(bz2.decompress(raw))
    return "\n\n".join(f"{title}\n\n{body}" for title, body in articles) + "\n", source


def load_text(spec: str, chars: int | None) -> TextChunk:
    """`builtin:wiki` or a UTF-8 file, cut to its first `chars` characters (None: all)."""
    if chars is not None and chars < 1:
        raise UsageError(f"--chars {chars}: give a positive number of characters.")
    if spec == BUILTIN_WIKI:
        text, source = wiki_text()
        return TextChunk.of(text, f"{BUILTIN_WIKI} ({source})", chars)
    if spec.startswith("builtin:"):
        raise UsageError(f"--text {spec}: the built-in text is {BUILTIN_WIKI}; otherwise give a file.")
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--text {spec}: no such file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--text {spec}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise UsageError(f"--text {spec}: cannot be read ({exc.strerror}).") from None
    if not text.strip():
        raise UsageError(f"--text {spec}: the file is empty.")
    return TextChunk.of(text, str(path), chars)
