"""Fuzzing bpfexec: targets (`fuzz.targets`), an atheris driver (`fuzz.run`), seed corpora.

See docs/fuzzing.md.
"""
