"""Derived inputs of the models: the weighted, time-decayed user-item matrix (interactions), customer
features and labels, and the time splits every evaluation uses.
"""
