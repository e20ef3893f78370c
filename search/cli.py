"""``staircase search`` (placeholder until the CLI lands in this commit series)."""


def register(subparsers) -> None:
    pass
