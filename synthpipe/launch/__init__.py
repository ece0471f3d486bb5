"""The `synthpipe` command, its configuration, and the torchrun entry point."""

__all__: list[str] = []  # the submodules: cli (the command), config, train (the job), torchrun
