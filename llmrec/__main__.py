"""`python -m llmrec ...` is the same as the `llmrec` command."""

from llmrec.cli import app

app(prog_name="llmrec")
