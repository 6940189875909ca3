"""The ``dicomnode`` command line: parse, call one function of the owning package, print.

Nothing imports the CLI, so it exports nothing; its entry point is
``dicomnode.cli.main:main`` (the ``dicomnode`` console script and ``python -m
dicomnode``). Subcommands are declared in :mod:`~dicomnode.cli.parser` and
:mod:`~dicomnode.cli.subcommands`, and their modules are imported only when they run.
"""

__all__: list[str] = []
