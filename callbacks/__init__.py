"""Lightning callbacks of cqr-lightning."""
