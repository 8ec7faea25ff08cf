"""GRPO math for Stage 2: rank-based rewards (`rewards`, plain Python) and the policy loss (`losses`, torch)."""
