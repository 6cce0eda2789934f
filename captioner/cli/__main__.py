"""`python -m captioner.cli`: the same as the `captioner` command."""

from captioner.cli import main

main()
