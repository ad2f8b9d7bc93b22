"""Recommendation lists: ALS fitting and tuning, the blockwise top-N engine, buy-again ranking, the
baselines, offline evaluation and its metrics, the lists a run ships, and similar items.
"""
