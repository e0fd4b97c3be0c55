"""The embedded default's models, built locally: a tokenizer, a teacher and a student base for a built-in
task.

Import-light (no torch at import time): the heavy imports happen inside ``build_tokenizer`` and ``bootstrap``.
"""

from raykd.embedded.bootstrap import EmbeddedModels, bootstrap, load
from raykd.embedded.recipe import ModelSize, Recipe
from raykd.embedded.tokenizer import build_tokenizer

__all__ = ["EmbeddedModels", "ModelSize", "Recipe", "bootstrap", "build_tokenizer", "load"]
