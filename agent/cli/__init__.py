"""The command line: every flag declared once (with env twins) and the subcommands.

Owns: turning argv and the environment into a typed configuration and a subcommand run.
May import: everything.
"""
