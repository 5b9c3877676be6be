"""charlm: character-level recurrent language models from the shell."""

__version__ = "0.1.0"
