"""Level 1 (how many channels per group) and level 2 (which): plans from analyses and targets."""
