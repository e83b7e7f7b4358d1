"""`python -m kerasllm` is the `kerasllm` command."""

from kerasllm.cli import main

main()
