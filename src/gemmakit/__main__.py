"""`python -m gemmakit ...` (also what `torchrun -m gemmakit` runs)."""

from .cli import main

main()
