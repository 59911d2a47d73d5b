"""Many runs: sweep.py (the grid of cells) run by runner.py (one `blocklora train` process per cell, locks shared by
concurrent sweeps) or emitted as a SLURM array (slurm.py); summarize.py and tables.py read the runs back into tables
and plots; reference.py holds the benchmark definitions and published numbers they compare with."""
