"""Activation: send times, holdouts, audiences, campaign bookkeeping, export files and the lift read-out.
"""
