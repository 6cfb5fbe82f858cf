"""`python -m vlp.cli ...`: the `vlp` command without its console script (how Slurm jobs launch it)."""

from vlp.cli import main

main()
