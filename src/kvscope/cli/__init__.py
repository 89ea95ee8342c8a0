"""The `kvscope` command line: thin commands over library functions."""
