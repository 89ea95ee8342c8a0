"""What a recording runs: the prompt sets and the generate loop of `kvscope record`.

The recorder (`kvscope.recorder`) is the capture library around any `generate`; this package is one
user of it, the command that loads a model (`kvscope.ppl.models.load_model`, shared with `kvscope
ppl`), generates over prompts and settles memory after each.
"""
