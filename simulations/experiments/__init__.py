"""Experiments: the cells of a sweep (one Flower run each), their records, learning-rate tuning."""
