"""Benchmarks of the pipeline; `python -m benchmarks` runs them all (benchmarks/__main__.py)."""


def parse_with_tiny(parser, argv: list[str] | None, tiny: dict):
    """parser's arguments from argv; with --tiny, tiny's values are the defaults (flags given with it still win)."""
    args = parser.parse_args(argv)
    if args.tiny:
        parser.set_defaults(**tiny)
        args = parser.parse_args(argv)
    return args
