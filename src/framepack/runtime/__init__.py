"""Running on the hardware at hand: memory plans (plan.py) and the mechanisms they apply (placement.py)."""
