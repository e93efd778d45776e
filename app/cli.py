"""The `switchyard` command line (placeholder; being written)."""

def main(argv: list[str] | None = None) -> int:
    raise SystemExit("not yet")
