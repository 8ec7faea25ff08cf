"""Lightning callbacks a run needs to be correct, which the stages add themselves: stopping on SIGTERM with a
checkpoint, the turn stream's position in checkpoints, validation after a resume, the step progress bar. The
observing callbacks (curves, tables, MLflow steps, the best adapter) live in the top-level `callbacks/`, built from
`conf/callbacks/`; nothing here imports them."""
