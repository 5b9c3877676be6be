"""The command-line layer: option parsing (app.py, options.py), one module per command body, and the
terminal and HTML rendering (display.py, explain_page.py). The only code that imports typer or rich.
"""

from charlm.cli.app import app, main

__all__ = ["app", "main"]
