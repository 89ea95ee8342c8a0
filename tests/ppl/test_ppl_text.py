"""The text `kvscope ppl` measures: `builtin:wiki` is the same characters on every run (hash), files
are cut and hashed, markup is stripped, and a missing wheel says how to get it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvscope.errors import UsageError
from kvscope.ppl import text as ppl_text
from kvscope.ppl.text import load_text, strip_wikitext

# sha256 of the first 100,000 characters of builtin:wiki (gensim 4.4.0's excerpt, strip_wikitext as
# committed): docs/benchmarks.md's table was measured on exactly these characters.
WIKI_100K_SHA256 = "da6ce6e0f34c331b76bd7516ca374eccdca05c4d747a4d306b9c5f7f7017c061"


def _wiki_available() -> bool:
    try:
        ppl_text._wiki_bytes()
    except UsageError:
        return False
    return True


needs_wiki = pytest.mark.skipif(not _wiki_available(), reason="the gensim 4.4.0 wheel is not in ~/.cache/kvscope/wheels "
                                "(make puts it there: pip download --no-deps gensim==4.4.0 -d ~/.cache/kvscope/wheels)")


@needs_wiki
def test_builtin_wiki_is_the_same_text_on_every_run() -> None:
    first = load_text("builtin:wiki", 100_000)
    assert first.chars == 100_000 and first.available_chars > 2_000_000
    assert first.sha256 == hashlib.sha256(first.text.encode()).hexdigest() == WIKI_100K_SHA256
    assert load_text("builtin:wiki", 100_000) == first
    assert first.text.startswith("Anarchism\n\nAnarchism is a political philosophy")
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "==", "&nbsp;"):
        assert markup not in first.text
    # another process, another hash seed: the same characters
    code = ("from kvscope.ppl.text import load_text; c = load_text('builtin:wiki', 100000); print(c.sha256, c.chars)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()
    assert out == [WIKI_100K_SHA256, "100000"]


@needs_wiki
def test_a_shorter_chunk_is_a_prefix() -> None:
    short, long = load_text("builtin:wiki", 1000), load_text("builtin:wiki", 5000)
    assert long.text.startswith(short.text) and short.sha256 != long.sha256


def test_missing_wheel_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KVSCOPE_WHEEL_DIR", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip download --no-deps gensim==4\.4\.0 -d .*cache/wheels"):
        load_text("builtin:wiki", 100)


def test_a_wheel_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import bz2
    import zipfile

    page = ("<mediawiki xmlns='http://www.mediawiki.org/xml/export-0.10/'><page><title>T</title><ns>0</ns>"
            "<revision><text>Hello [[world|World]]{{cite}}.</text></revision></page>"
            "<page><title>R</title><ns>0</ns><redirect title='T'/><revision><text>#REDIRECT [[T]]</text></revision>"
            "</page><page><title>Talk:T</title><ns>1</ns><revision><text>talk</text></revision></page></mediawiki>")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gensim-4.4.0-cp311-none-any.whl", "w") as archive:
        archive.writestr(ppl_text.WIKI_MEMBER, bz2.compress(page.encode()))
    monkeypatch.setenv("KVSCOPE_WHEEL_DIR", str(wheels))
    chunk = load_text("builtin:wiki", None)
    assert chunk.text == "T\n\nHello World.\n"
    assert chunk.source.startswith("builtin:wiki (gensim-4.4.0-cp311-none-any.whl")


def test_a_file_is_cut_and_hashed(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("héllo wörld " * 100, encoding="utf-8")
    chunk = load_text(str(path), 50)
    assert chunk.chars == 50 and chunk.text == ("héllo wörld " * 100)[:50] and chunk.available_chars == 1200
    assert chunk.sha256 == hashlib.sha256(chunk.text.encode("utf-8")).hexdigest()


@pytest.mark.parametrize("content, message", [(b"\xff\xfe\x00bad", "not UTF-8"), (b"  \n", "empty")])
def test_bad_files_are_usage_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_text(str(path), None)


def test_strip_wikitext() -> None:
    markup = """{{Infobox|name={{nested|x}}}}'''Anarchism''' is a [[political philosophy]] that \
advocates [[self-governance|self-governed]] societies.<ref name="a">{{cite book|title=X}}</ref>
== History ==
[[File:Flag.svg|thumb|A flag with a [[link]] in its caption]]
* First item with [http://example.org an external link]
{| class="wikitable"
| cell || cell
|}
<!-- a comment -->Tom &amp; Jerry.
[[Category:Anarchism]]"""
    assert strip_wikitext(markup) == ("Anarchism is a political philosophy that advocates self-governed societies."
                                      "\n\nHistory\n\nFirst item with an external link\n\nTom & Jerry.")
