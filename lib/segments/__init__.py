"""Customer segments from the NMF (the engine is ``lib.nmf``): the matrix it factorizes, the assignment of
customers, profiles and labels, and the stage's report.
"""
