"""Generated samples for the Quick start, tests and benchmarks: the planted clickstream, a realistic
retail-like sample, repeat purchases and a sent campaign.
"""
