"""Lightning modules: the warm-up SFT stage and the GRPO stage."""
