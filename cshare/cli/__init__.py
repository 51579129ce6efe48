"""The `cshare` command line: the typer app, its fast path, and the command modules.

launch (the installed entry point: plain convert/restore/verify run without
loading typer or rich), app (the typer application), console (output:
rich, JSON, one-line errors), convert_cmd and store_cmd (what each command
prints around the work the lower folders do).  The top layer, beside demo.
This file imports nothing: launch must start light.
"""
