"""Churn and purchase scores: features to models, calibration, the purchase (BG/NBD-style) model and the
score report.
"""
