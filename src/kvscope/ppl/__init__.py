"""`kvscope ppl`: perplexity of a model and its 8-bit variants over a fixed text, each run recorded.

- `kvscope.ppl.text`: the text (a file or `builtin:wiki`), cut, counted and hashed (no torch);
- `kvscope.ppl.models`: a model directory, a GGUF file, a twin or `builtin:smollm2`;
- `kvscope.ppl.quantize`: the variants (`none`, `int8`, `int8-quanto`, `int8-bnb`) and weight bytes;
- `kvscope.ppl.evaluate`: strided sliding-window perplexity, each variant recorded by kvscope.

This package needs torch (except `text`): the analyser never imports it. See docs/ppl.md.
"""
