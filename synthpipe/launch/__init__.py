"""The `synthpipe` command, its configuration, and the torchrun entry point."""
